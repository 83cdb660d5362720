"""Metric families as plain data (pure): what `admin.observe` measures and `adapters.prometheus`
exposes. Names follow Prometheus conventions: the `libvirt_executor_` prefix, base units
(`_seconds`, `_bytes`), `_total` for counters, and label values from bounded sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PREFIX = "libvirt_executor_"
COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"
INFO = "info"


@dataclass(frozen=True)
class Buckets:
    """A histogram's value: (upper bound, cumulative count) pairs without +Inf, sum and count."""

    cumulative: Sequence[tuple[float, int]]
    sum: float
    count: int


@dataclass(frozen=True)
class Sample:
    labels: Mapping[str, str]
    value: float | Buckets | Mapping[str, str]  # a number; Buckets for a histogram; the info's labels


@dataclass(frozen=True)
class Family:
    name: str  # without PREFIX; a counter's ends in _total
    kind: str  # COUNTER | GAUGE | HISTOGRAM | INFO
    help: str
    label_names: Sequence[str] = ()
    samples: list[Sample] = field(default_factory=list)

    def add(self, value: float | Buckets | Mapping[str, str], **labels: str) -> Family:
        self.samples.append(Sample(labels, value))
        return self
