"""One progress-event type for every long job, and one helper that runs a job to its end."""

import pytest
from tiny_models import random_windows, tiny_model

from entrodrop.calibrate import CalibrationEvent, iter_calibration, run_calibration
from entrodrop.progress import ProgressEvent, last_event, run_to_end


def _job(n: int):
    for i in range(1, n + 1):
        yield ProgressEvent("compare", i, n, list(range(i)))


def test_run_to_end_returns_the_last_partial_result():
    assert run_to_end(_job(3)) == [0, 1, 2]
    assert last_event(_job(3)) == ProgressEvent("compare", 3, 3, [0, 1, 2])
    assert last_event(_job(0)) is None
    assert run_to_end(_job(0), default=[]) == []
    with pytest.raises(ValueError, match="no result"):
        run_to_end(_job(0))


def test_fraction_and_finished():
    event = ProgressEvent("speed", 1, 4)
    assert event.fraction == 0.25 and not event.finished
    assert ProgressEvent("select", 0, 0).fraction == 1.0 and ProgressEvent("select", 0, 0).finished


def test_calibration_events_are_progress_events_with_their_extras():
    model = tiny_model("llama")
    windows = random_windows(3, 40)
    events = list(iter_calibration(model, windows))
    assert all(isinstance(e, ProgressEvent) and isinstance(e, CalibrationEvent) for e in events)
    assert [e.stage for e in events] == ["calibrate"] * 3
    assert [e.total for e in events] == [3, 3, 3]
    assert [e.tokens_seen for e in events] == [40, 80, 120]
    assert events[0].scores is events[0].partial and events[0].scores.batches_done == 1
    assert [e.finished for e in events] == [False, False, True]
    assert events[1].fraction == pytest.approx(2 / 3)
    assert run_to_end(iter_calibration(model, windows)).to_dict() == run_calibration(model, windows).to_dict()
