"""The app's data-source widgets as load_corpus keyword arguments, and their errors."""

import pytest

from entrodrop.ui.sources import data_source_args


def test_data_source_args_and_their_errors(tmp_path):
    assert data_source_args("gsm8k") == {"source": "gsm8k", "column": None, "text": None}
    f = tmp_path / "t.csv"
    assert data_source_args("file", upload=str(f), column=" body ")["column"] == "body"
    assert data_source_args("hub", hub_name=" wikitext:wikitext-2-raw-v1 ")["source"] == "wikitext:wikitext-2-raw-v1"
    assert data_source_args("text", text="some words")["text"] == "some words"
    with pytest.raises(ValueError, match="pasted text is empty"):
        data_source_args("text", text="  \n ")
    with pytest.raises(ValueError, match="No file uploaded"):
        data_source_args("file")
    with pytest.raises(ValueError, match="No data set name"):
        data_source_args("hub", hub_name="")
    with pytest.raises(ValueError, match="Unknown data source"):
        data_source_args("ftp")
