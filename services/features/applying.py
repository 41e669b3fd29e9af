"""One batch of candles applied to the indicator state, each candle judged alone.

A candle is rejected, with its reason, before it changes anything when its numbers are beyond
what a Binance kline can carry (``bounds``) or the engine finds it impossible. The batch is then
applied in one engine call, as a transaction over the keys it touches: a key whose values or
state come out non-finite is put back as it was and its candles are applied again one at a
time, so only the candle that would poison it is rejected and its batch-mates (of its own key
and of every other) are published. Anything raised on the way puts every touched key back, so a
retry of the batch finds the state as it was, not a batch of duplicates.

Every event carries its key's ``feature_origin``: the open time of the first candle folded into
the key's state (``origins``, kept by the caller beside the engine, whose snapshot cannot hold
it). A key without state starts it at its first applied candle; under ``gap_policy="reset"`` a
candle after a gap starts it again. Cumulative indicators (OBV, VPT) are offset by everything
folded before, so inference compares this with the origin a model was trained from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import orjson

from libs.common.contracts import FeaturesEvent, KlineEvent, Prepared
from libs.indicators.kernels import ST_DUPLICATE, ST_INVALID, ST_OK
from libs.indicators.streaming import StreamingEngine, UpdateBatch
from services.features import bounds

log = logging.getLogger("klinebus.features")


@dataclass
class Applied:
    """What a batch gave: per candle the event to publish (None: a duplicate or rejected)."""

    fresh: list[Prepared | None]
    rejected: list[tuple[KlineEvent, str]] = field(default_factory=list)
    duplicates: int = 0
    gaps: list[tuple[KlineEvent, int]] = field(default_factory=list)  # (candle, ms late)

    @property
    def publish(self) -> list[Prepared]:
        return [e for e in self.fresh if e is not None]


Origins = dict[tuple[str, str], "int | None"]


def apply(engine: StreamingEngine, events: list[KlineEvent], computed_at: int, origins: Origins) -> Applied:
    """``origins``: per key with state, its first folded candle (None: unknown); updated here."""
    n = len(events)
    if not n:
        return Applied([])
    touched = {(e.symbol, e.interval) for e in events}
    saved_origins = {k: origins[k] for k in touched if k in origins}
    stateless = {k for k in touched if engine.last_open_time(k) is None}
    # One conversion for the batch (float64 holds ms timestamps exactly up to 2**53).
    cols = np.array([(e.open_time, e.open, e.high, e.low, e.close, e.volume) for e in events], dtype=np.float64).T
    rejected = bounds.beyond(events, cols)
    keep = np.array([i for i in range(n) if i not in rejected], dtype=np.int64) if rejected else None
    rows = engine.slots([(e.symbol, e.interval) for e in events])
    if keep is not None:
        rows, cols = rows[keep], cols[:, keep]
    saved = engine.save_rows(rows)
    try:
        result = engine.update_slots(rows, cols[0].astype(np.int64), cols[1], cols[2], cols[3], cols[4], cols[5])
        poisoned = _poisoned(engine, result, rows, saved.rows)
        if poisoned.size:
            engine.restore_rows(saved, poisoned)
            for j in np.flatnonzero(np.isin(rows, poisoned)).tolist():
                reason = _apply_one(engine, result, rows, cols, j)
                if reason is not None:
                    i = j if keep is None else int(keep[j])
                    e = events[i]
                    rejected[i] = f"{e.symbol} {e.interval} open_time={e.open_time}: {reason}"
        return _outcome(engine, events, result, keep, rejected, computed_at, origins, stateless)
    except BaseException:
        engine.restore_rows(saved)
        for k in touched:
            origins.pop(k, None)
        origins.update(saved_origins)
        raise


def _poisoned(engine: StreamingEngine, result: UpdateBatch, rows: np.ndarray, touched: np.ndarray) -> np.ndarray:
    """The state rows whose values (where warm) or state hold a number that is not finite."""
    ok = result.status == ST_OK
    bad_values = ok & ~np.isfinite(result.values).all(axis=1)
    bad = set(rows[bad_values].tolist()) if bad_values.any() else set()
    finite = engine.finite_rows(touched)
    if not finite.all():
        bad.update(touched[~finite].tolist())
    return np.array(sorted(bad), dtype=np.int64)


def _apply_one(engine: StreamingEngine, result: UpdateBatch, rows: np.ndarray, cols: np.ndarray, j: int) -> str | None:
    """Apply candle ``j`` of the batch alone, writing its outcome into ``result``; put its key
    back and return why when it would leave something non-finite."""
    row = rows[j : j + 1]
    one_saved = engine.save_rows(row)
    one = engine.update_slots(row, cols[0, j : j + 1].astype(np.int64), *(cols[c, j : j + 1] for c in range(1, 6)))
    st = int(one.status[0])
    values_bad = st == ST_OK and not np.isfinite(one.values[0]).all()
    if values_bad or not engine.finite_rows(row).all():
        engine.restore_rows(one_saved)
        result.status[j] = ST_INVALID
        result.reasons[j] = ""
        if values_bad:
            names = [n for n, v in zip(result.names, one.values[0].tolist()) if not np.isfinite(v)]
            return f"indicators would not be finite ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        return "the indicator state would not be finite"
    result.status[j] = st
    result.gap_ms[j] = one.gap_ms[0]
    result.values[j] = one.values[0]
    if st == ST_INVALID:
        result.reasons[j] = one.reasons[0]
    return None


def _outcome(engine: StreamingEngine, events: list[KlineEvent], result: UpdateBatch, keep: np.ndarray | None,
             rejected: dict[int, str], computed_at: int, origins: Origins, stateless: set) -> Applied:
    n = len(events)
    out = Applied([None] * n)
    status = result.status.tolist()
    gap_ms = result.gap_ms.tolist()
    restarts_on_gap = engine.gap_policy == "reset"  # the kernel zeroes the state at a gap
    index = range(n) if keep is None else keep.tolist()
    writer = _writer(engine.feature_set.id, tuple(result.names))
    values_json = writer.rows(result.values, result.status) if writer is not None else []
    fresh = out.fresh
    check = True
    for j, i in enumerate(index):
        st = status[j]
        if i in rejected:
            continue
        e = events[i]
        if st == ST_INVALID:
            rejected[i] = f"{e.symbol} {e.interval} open_time={e.open_time}: {result.reasons[j].split(': ', 1)[-1]}"
            continue
        if st == ST_DUPLICATE:
            out.duplicates += 1
            continue
        if gap_ms[j]:
            out.gaps.append((e, gap_ms[j]))
        key = (e.symbol, e.interval)
        if key in stateless or (restarts_on_gap and gap_ms[j]):
            stateless.discard(key)
            origins[key] = e.open_time
        elif key not in origins:  # state the engine got past ``origins``: where it started is not known
            origins[key] = None
        warm = st == ST_OK
        if writer is None:
            values = dict(zip(result.names, result.values[j].tolist())) if warm else {}
            fresh[i] = FeaturesEvent.prepared(e.symbol, e.interval, e.open_time, e.close, engine.feature_set.id,
                                              values, warm, e.ingested_at, computed_at, origins[key])
            continue
        prepared = writer.event(e, values_json[j], warm, computed_at, origins[key])
        if check:
            # The first event of a batch is also written by the contract's own serialiser, and
            # must come out byte for byte the same; else the template is given up for good.
            check = False
            values = dict(zip(result.names, result.values[j].tolist())) if warm else {}
            expected = FeaturesEvent.prepared(e.symbol, e.interval, e.open_time, e.close, writer.feature_set,
                                              values, warm, e.ingested_at, computed_at, origins[key])
            if expected.payload != prepared.payload:
                log.error("features.v1 template wrote %r where the contract writes %r; writing every event "
                          "through FeaturesEvent.prepared from now on", prepared.payload[:300], expected.payload[:300])
                _writers[writer.key] = None
                writer = None
                prepared = expected
        fresh[i] = prepared
    out.rejected = [(events[i], rejected[i]) for i in sorted(rejected)]
    return out


class _Writer:
    """features.v1 payloads of one feature set, written from a template: the bytes
    ``FeaturesEvent.prepared`` writes (orjson), without a dict of values and an orjson call per
    event. A batch's warm value rows are serialised by one orjson call over the (rows, names)
    matrix (orjson writes a float64 of a numpy array exactly as a Python float) and each row's
    numbers are put between the names by one bytes formatting."""

    def __init__(self, feature_set: str, names: tuple[str, ...]) -> None:
        self.key = (feature_set, names)
        self.feature_set = feature_set
        self.names = names
        self.width = len(names)
        pairs = b",".join(orjson.dumps(name).replace(b"%", b"%%") + b":%b" for name in names)
        self.values_template = b"{" + pairs + b"}"
        self.head = b'{"schema_version":1,"symbol":'
        self.middle = b',"feature_set":' + orjson.dumps(feature_set) + b',"values":'
        self._keys: dict[tuple[str, str], bytes] = {}

    def rows(self, values: np.ndarray, status: np.ndarray) -> list[bytes]:
        """Per row of the batch: its ``values`` object (``{}`` where the row is not warm)."""
        out = [b"{}"] * len(status)
        ok = np.flatnonzero(status == ST_OK)
        if not ok.size:
            return out
        if not self.width:
            for j in ok.tolist():
                out[j] = b"{}"
            return out
        matrix = np.ascontiguousarray(values[ok], dtype=np.float64)
        whole = orjson.dumps(matrix, option=orjson.OPT_SERIALIZE_NUMPY)  # b"[[..],[..]]"
        template = self.values_template
        for j, row in zip(ok.tolist(), whole[2:-2].split(b"],[")):
            out[j] = template % tuple(row.split(b","))
        return out

    def event(self, e: KlineEvent, values: bytes, warm: bool, computed_at: int, origin: int | None) -> Prepared:
        key = (e.symbol, e.interval)
        identity = self._keys.get(key)
        if identity is None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            identity = self._keys[key] = (self.head + orjson.dumps(e.symbol) + b',"interval":'
                                          + orjson.dumps(e.interval) + b',"open_time":')
        ingested, open_time = e.ingested_at, e.open_time
        payload = b"".join((
            identity, b"%d" % open_time if type(open_time) is int else orjson.dumps(open_time),
            b',"close":', orjson.dumps(e.close), self.middle, values,
            b',"warm":true,"kline_ingested_at":' if warm else b',"warm":false,"kline_ingested_at":',
            b"%d" % ingested if type(ingested) is int else orjson.dumps(ingested),
            b',"computed_at":', b"%d" % computed_at if type(computed_at) is int else orjson.dumps(computed_at),
            b',"feature_origin":', b"%d" % origin if type(origin) is int else orjson.dumps(origin), b"}",
        ))
        return Prepared(e.symbol, e.interval, e.open_time, payload)


# Per (feature set, names): its writer, or None where the template cannot be used (names that
# repeat: a dict keeps one of each) or once it wrote other bytes than the contract.
_writers: dict[tuple[str, tuple[str, ...]], "_Writer | None"] = {}


def _writer(feature_set: str, names: tuple[str, ...]) -> "_Writer | None":
    key = (feature_set, names)
    if key not in _writers:
        _writers[key] = _Writer(feature_set, names) if len(set(names)) == len(names) else None
    return _writers[key]
