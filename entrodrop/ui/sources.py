"""Step 2's data-source widgets as :func:`~entrodrop.data.load_corpus` keyword arguments (form mapping,
so it lives with the app; the calibration and the checks take the resulting dict)."""

from __future__ import annotations

DATA_SOURCES = ("gsm8k", "gpqa", "file", "hub", "text")


def data_source_args(choice: str, *, upload: str | None = None, hub_name: str | None = None,
                     column: str | None = None, text: str | None = None) -> dict:
    """``load_corpus`` keyword arguments (``source``, ``column``, ``text``) for the UI's data choice."""
    column = (column or "").strip() or None
    if choice in ("gsm8k", "gpqa"):
        return {"source": choice, "column": column, "text": None}
    if choice == "file":
        if not upload:
            raise ValueError("No file uploaded. Upload a .txt, .jsonl, .csv or .parquet file, or pick a bundled set.")
        return {"source": str(upload), "column": column, "text": None}
    if choice == "hub":
        name = (hub_name or "").strip()
        if not name:
            raise ValueError("No data set name given. Type a Hugging Face data set such as "
                             "wikitext:wikitext-2-raw-v1, or pick a bundled set.")
        return {"source": name, "column": column, "text": None}
    if choice == "text":
        if not (text or "").strip():
            raise ValueError("The pasted text is empty. Paste some text (a few paragraphs), or pick a bundled set.")
        return {"source": "text", "column": None, "text": text}
    raise ValueError(f"Unknown data source {choice!r}; choose one of {', '.join(DATA_SOURCES)}.")
