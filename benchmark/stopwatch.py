"""Where a run's time goes: seconds per named stage (intake, cache building, training, evaluation,
...), so a slow run explains itself. A stage timed inside another counts only for itself (the cache
built during phase 2 is not training time), so the stages add up to the time they cover.

Stages are timed into every stopwatch running at that moment (`running`): the bench command's and
the current MLflow run's, so code deep in the trainer needs no stopwatch passed down."""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager

_running: list["Stopwatch"] = []


class Stopwatch:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._open: list[list] = []  # [started, seconds of the stages inside it]
        self.started = time.perf_counter()

    @contextmanager
    def _stage(self, name: str):
        entry = [time.perf_counter(), 0.0]
        self._open.append(entry)
        try:
            yield
        finally:
            self._open.pop()
            total = time.perf_counter() - entry[0]
            self.seconds[name] = self.seconds.get(name, 0.0) + total - entry[1]
            if self._open:
                self._open[-1][1] += total


    def line(self) -> str:
        """'time: 812 s; intake 95 s (12%), cache 120 s (15%), training 500 s (62%), ...; outside the
        training epochs 38%' for the time since this stopwatch started; 'other' is what no stage covers."""
        total = time.perf_counter() - self.started
        parts = {**self.seconds, "other": max(total - sum(self.seconds.values()), 0.0)}
        shares = ", ".join(f"{name} {seconds:.0f} s ({100 * seconds / total:.0f}%)" for name, seconds in parts.items()
                           if seconds >= 0.5)
        outside = 100 * (total - self.seconds.get("training", 0.0)) / total
        return f"time: {total:.0f} s; {shares}; outside the training epochs {outside:.0f}%"


def as_metrics(seconds: dict[str, float]) -> dict[str, float]:
    """Stage seconds as MLflow metrics: stage_<name>_seconds (spaces as underscores)."""
    return {f"stage_{name.replace(' ', '_')}_seconds": value for name, value in seconds.items()}


@contextmanager
def running(watch: Stopwatch):
    """Time stages into `watch` (too) while this is open."""
    _running.append(watch)
    try:
        yield watch
    finally:
        _running.remove(watch)


@contextmanager
def stage(name: str):
    """Time this block as stage `name` in every running stopwatch (none running: nothing)."""
    with ExitStack() as stack:
        for watch in list(_running):
            stack.enter_context(watch._stage(name))
        yield
