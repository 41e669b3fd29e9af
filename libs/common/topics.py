"""The versioned topic names, in one place.

Nothing else in the code spells a topic name: a topic's version is part of its
name, so a breaking change to an event is a new topic (``klines.v2``) that
old and new consumers can run side by side.
"""

from __future__ import annotations

import zlib

KLINES = "klines.v1"
"""Closed candles, one event per (symbol, interval, open_time)."""
KLINES_LIVE = "klines-live.v1"
"""In-progress candle updates (``x: false``) for live charts; capped short."""
FEATURES = "features.v1"
"""Indicator values for one closed candle."""
CHARTS = "charts.v1"
"""A rendered chart artifact."""
CHART_REQUESTS = "chart-requests.v1"
"""Asks the charts service for a chart now, outside its cadence."""
PREDICTIONS = "predictions.v1"
"""A model's forecast for the next candle(s)."""
SCORES = "scores.v1"
"""A forecast scored against the candle it targeted, beside persistence."""
ANALYSES = "analyses.v1"
"""A vision-language model's structured reading of a chart."""
ALERTS = "alerts.v1"
"""A fired alert rule."""
DATASETS = "datasets.v1"
"""A request to build a training dataset and train on it."""
MODELS = "models.v1"
"""A trained, evaluated model was published."""
DEAD_LETTERS = "dead-letters.v1"
"""Messages a service could not use, with the reason."""

ALL_TOPICS: tuple[str, ...] = (
    KLINES,
    KLINES_LIVE,
    FEATURES,
    CHARTS,
    CHART_REQUESTS,
    PREDICTIONS,
    SCORES,
    ANALYSES,
    ALERTS,
    DATASETS,
    MODELS,
    DEAD_LETTERS,
)

KEY_PREFIX = "klinebus"

PARTITIONED: frozenset[str] = frozenset({KLINES, FEATURES})
"""The keyed topics that may be split into partitions (``KLINEBUS_PARTITIONS``). Every other topic
is one stream whatever the partition count (docs/bus.md#partitions)."""


def partition_of(symbol: str, interval: str, partitions: int) -> int:
    """The partition of a (symbol, interval) among ``partitions``: CRC-32 of ``symbol:interval``,
    so any process in any language maps a key to the same partition."""
    if partitions <= 1:
        return 0
    return zlib.crc32(f"{symbol}:{interval}".encode()) % partitions


def stream_key(topic: str, partition: int = 0) -> str:
    """The Redis key of a topic's stream (of one of its partitions).

    The topic sits in a hash tag so each topic's stream and its companion keys
    (``stream_companion_key``) land in one Redis Cluster slot, while different
    topics spread over the cluster. Partition 0 is the topic's own key, so one partition is the
    unpartitioned layout; partition i > 0 has its own hash tag (``{klines.v1#i}``) so the
    partitions of one topic spread over the cluster's shards too.
    """
    if topic not in ALL_TOPICS:
        raise ValueError(f"unknown topic {topic!r}; known: {', '.join(ALL_TOPICS)}")
    if partition:
        if topic not in PARTITIONED:
            raise ValueError(f"{topic} is not partitioned (partitioned: {', '.join(sorted(PARTITIONED))})")
        if partition < 0:
            raise ValueError(f"partition must be >= 0, got {partition}")
        return f"{KEY_PREFIX}:{{{topic}#{partition}}}"
    return f"{KEY_PREFIX}:{{{topic}}}"


def stream_keys(topic: str, partitions: int) -> list[str]:
    """Every stream of ``topic`` under ``partitions`` (one for an unpartitioned topic)."""
    if topic not in PARTITIONED:
        return [stream_key(topic)]
    return [stream_key(topic, p) for p in range(max(1, partitions))]


def partitions_of(topic: str, partitions: int) -> range:
    """The partition numbers ``topic`` has under ``partitions`` (``range(1)`` when unpartitioned)."""
    return range(max(1, partitions)) if topic in PARTITIONED else range(1)


def stream_companion_key(topic: str, what: str, partition: int = 0) -> str:
    """A key kept beside a topic's stream (one partition's) in the same cluster slot (dedupe sets,
    offsets, fences, a partition's checkpoints)."""
    return f"{stream_key(topic, partition)}:{what}"


PARTITIONS_KEY_TOPIC = KLINES
"""The recorded partition count lives beside klines.v1: ``stream_companion_key(KLINES, "partitions")``."""


def partitions_key() -> str:
    return stream_companion_key(PARTITIONS_KEY_TOPIC, "partitions")


# --- who may do what (the ACL file is generated from this: libs/common/acl.py) -------------------


class Access:
    """What one service (one Redis ACL user, named ``klinebus-<service>``) may do on the bus.

    ``produces``: topics it appends to (XADD), with their dedupe companion keys.
    ``consumes``: topics it reads through its consumer group (named after the service), with
    the group's position and fence keys.
    ``state``: companion-key globs (``(topic, suffix glob)``) holding the service's own state.
    Every user may also read every topic stream (XRANGE/XREVRANGE/XREAD/XINFO): topics are not
    secret from each other inside the bus; writing is what is confined.
    """

    __slots__ = ("service", "produces", "consumes", "state")

    def __init__(
        self,
        service: str,
        produces: tuple[str, ...] = (),
        consumes: tuple[str, ...] = (),
        state: tuple[tuple[str, str], ...] = (),
    ) -> None:
        for t in (*produces, *consumes, *(t for t, _ in state)):
            stream_key(t)  # raises on an unknown topic
        self.service = service
        self.produces = (*produces, DEAD_LETTERS) if DEAD_LETTERS not in produces else produces
        self.consumes = consumes
        self.state = state

    def __repr__(self) -> str:
        return f"Access({self.service!r}, produces={self.produces}, consumes={self.consumes}, state={self.state})"


ACCESS: dict[str, Access] = {
    a.service: a
    for a in (
        Access("ingest", produces=(KLINES, KLINES_LIVE)),
        Access("archive", consumes=(KLINES,)),
        Access("features", produces=(FEATURES,), consumes=(KLINES,),
               state=((FEATURES, "engine-state"), (FEATURES, "warming"))),
        Access("charts", produces=(CHARTS,), consumes=(KLINES, CHART_REQUESTS)),
        Access("inference", produces=(PREDICTIONS, SCORES, ALERTS), consumes=(FEATURES, MODELS, CHARTS)),
        Access("vlm", produces=(ANALYSES,), consumes=(CHARTS,),
               state=((CHARTS, "vlm:*"), (ANALYSES, "vlm:*"))),
        Access("trainer", produces=(MODELS,), consumes=(DATASETS,),
               state=((DATASETS, "done:*"), (DATASETS, "progress:*"))),
        Access("alerts", consumes=(ALERTS,),
               state=((ALERTS, "active"), (ALERTS, "owed"), (ALERTS, "alert:*"), (ALERTS, "lock:*"))),
        # People and their tools: `klinebus tail`, dataset and chart requests.
        Access("operator", produces=(DATASETS, CHART_REQUESTS)),
    )
}
"""Per service: the topics it produces and consumes. A topic's producers are its writers; nobody
else may append to it."""


def producers(topic: str) -> tuple[str, ...]:
    """The services that may append to ``topic``."""
    return tuple(s for s, a in ACCESS.items() if topic in a.produces)
