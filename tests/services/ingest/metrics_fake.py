"""A stand-in for IngestMetrics that records every count, so tests can read them back."""

from __future__ import annotations

from collections import Counter


class _Series:
    def __init__(self, name: str, counts: Counter) -> None:
        self.name = name
        self.counts = counts
        self.label = ""

    def labels(self, *values: str) -> _Series:
        child = _Series(self.name, self.counts)
        child.label = ",".join(values)
        return child

    def inc(self, n: float = 1) -> None:
        self.counts[(self.name, self.label)] += n

    def observe(self, value: float) -> None:
        self.counts[(self.name + ":observations", self.label)] += 1

    def set(self, value: float) -> None:
        self.counts[(self.name, self.label)] = value


class RecordingMetrics:
    """Any attribute is a metric; ``count("backfill_failures", "1m")`` reads it back."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __getattr__(self, name: str) -> _Series:
        return _Series(name, self.counts)

    def count(self, name: str, label: str = "") -> float:
        return self.counts[(name, label)]
