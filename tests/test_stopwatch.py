"""Stage timing on a fake clock: a stage inside another counts only for itself, every running
stopwatch gets the stage, and the line names the share outside the training epochs."""
import pytest

from benchmark import stopwatch


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(stopwatch.time, "perf_counter", lambda: now[0])
    return now


def test_nested_stages_count_only_for_themselves_in_every_running_stopwatch(clock):
    outer = stopwatch.Stopwatch()
    with stopwatch.running(outer):
        with stopwatch.stage("intake"):
            clock[0] += 10
        inner = stopwatch.Stopwatch()
        with stopwatch.running(inner):
            with stopwatch.stage("training"):
                clock[0] += 30
                with stopwatch.stage("cache"):
                    clock[0] += 20
                clock[0] += 40
            with stopwatch.stage("training"):  # a second time adds up
                clock[0] += 5
        clock[0] += 15  # no stage: "other"
        line = outer.line()
    assert outer.seconds == {"intake": 10, "cache": 20, "training": 75}
    assert inner.seconds == {"cache": 20, "training": 75}
    assert stopwatch.as_metrics(inner.seconds) == {"stage_cache_seconds": 20, "stage_training_seconds": 75}
    assert line == ("time: 120 s; intake 10 s (8%), cache 20 s (17%), training 75 s (62%), other 15 s (12%); "
                    "outside the training epochs 38%")
    with stopwatch.stage("nothing running"):  # no stopwatch: nothing recorded, nothing fails
        clock[0] += 1
    assert "nothing running" not in outer.seconds
