"""The features domain state machine on its own: no Redis, no event loop.

Each candle is judged alone (a poisoned candle is rejected with its reason before it touches the
state, its batch-mates are applied), the waiting room holds a new key's candles until its
release, and the checkpoint position never passes a waiting candle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson
import pytest

from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from libs.indicators.batch import compute_batch
from libs.indicators.feature_sets import get_feature_set
from services.features import applying, bounds
from services.features.state import FeaturesState
from tests.candles import BTC_15M

NOW = 1_700_000_000_000


def series(symbol: str, n: int) -> list[KlineEvent]:
    return [KlineEvent.from_kline(replace(k, symbol=symbol)) for k in read_kline_csv(BTC_15M, "BTCUSDT", "15m")[:n]]


def reference(events: list[KlineEvent], names) -> dict[str, np.ndarray]:
    cols = [np.array([getattr(e, f) for e in events]) for f in ("open", "high", "low", "close", "volume")]
    return compute_batch(*cols, names=list(names))


def values(published: list, symbol: str) -> list[dict]:
    return [orjson.loads(p.payload) for p in published if p.symbol == symbol]


def finite(event: dict) -> bool:
    return all(np.isfinite(v) for v in event["values"].values())


def poisoned(e: KlineEvent, **numbers: float) -> KlineEvent:
    # model_construct: what the decoder hands over for a foreign producer's entry that passes
    # KlineEvent's rules (these numbers do: finite, positive, high >= low).
    return KlineEvent.model_construct(**{**e.model_dump(), **numbers})


@pytest.mark.parametrize("feature_set, numbers", [
    ("all-v1", dict(volume=1.7e308)),  # OBV and VPT would overflow
    ("skeleton-v1", dict(open=1e308, high=1e308, low=1e308, close=1e308)),  # SMA-20's sum would
])
def test_a_candle_beyond_what_a_kline_carries_is_rejected_alone_and_the_state_stays_clean(feature_set, numbers):
    state = FeaturesState(feature_set, "continue", warms_up=False)
    w = get_feature_set(feature_set).warmup_candles + 5
    a, b, c = series("AAAUSDT", w + 15), series("BBBUSDT", w + 15), series("CCCUSDT", w + 15)
    state.apply([e for i in range(w) for e in (a[i], b[i], c[i])], NOW)  # every key warm
    bad = poisoned(b[w], **numbers)
    batch = [a[w], bad, c[w]] + [e for i in range(w + 1, w + 15) for e in (a[i], b[i], c[i])]
    out = state.apply(batch, NOW)

    assert [(e.symbol, e.open_time) for e, _ in out.rejected] == [("BBBUSDT", b[w].open_time)]
    assert "beyond what a Binance kline can carry" in out.rejected[0][1]
    assert len(out.publish) == len(batch) - 1  # every batch-mate, of its own key and of the others
    names = get_feature_set(feature_set).features
    clean = b[:w] + b[w + 1:]  # the rejected candle never happened: a hole, computed across as batch does
    ref = reference(clean, names)
    got = values(out.publish, "BBBUSDT")
    assert [e["open_time"] for e in got] == [e.open_time for e in b[w + 1:]]
    for j, e in enumerate(got, start=w):
        assert e["warm"]
        for name in names:
            assert e["values"][name] == pytest.approx(ref[name][j], rel=1e-9, abs=1e-9), (name, j)


def test_a_non_finite_result_the_bounds_let_through_is_caught_per_key(monkeypatch):
    """The second line: whatever makes a key's values or state non-finite (here the bounds are
    switched off) puts that key back and rejects only that candle."""
    monkeypatch.setattr(bounds, "beyond", lambda events, cols: {})
    state = FeaturesState("all-v1", "continue", warms_up=False)
    a, b = series("AAAUSDT", 60), series("BBBUSDT", 60)
    state.apply([e for i in range(40) for e in (a[i], b[i])], NOW)
    before = state.engine.snapshot()
    batch = [a[40], b[40], poisoned(b[41], volume=1.7e308), a[41], b[42]]
    out = state.apply(batch, NOW)
    assert [(e.open_time, "not be finite" in why) for e, why in out.rejected] == [(b[41].open_time, True)]
    assert sorted((p.symbol, p.open_time) for p in out.publish) == sorted(
        (e.symbol, e.open_time) for e in (a[40], b[40], a[41], b[42]))
    assert all(finite(v) for v in values(out.publish, "BBBUSDT"))
    assert state.engine.finite_rows(state.engine.slots([("BBBUSDT", "15m")])).all()
    assert before != state.engine.snapshot()


def test_a_failure_while_applying_leaves_the_state_as_it_was(monkeypatch):
    """A retry of the batch must find its candles new, not duplicates with nothing to publish."""
    state = FeaturesState("skeleton-v1", "continue", warms_up=False)
    a = series("AAAUSDT", 30)
    state.apply(a[:20], NOW)
    snapshot = state.engine.snapshot()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while building events")

    with monkeypatch.context() as m:
        m.setattr(applying.FeaturesEvent, "prepared", broken)
        with pytest.raises(RuntimeError):
            state.apply(a[20:], NOW)
    assert state.engine.snapshot() == snapshot
    assert [p.open_time for p in state.apply(a[20:], NOW).publish] == [e.open_time for e in a[20:]]


def test_impossible_and_duplicate_candles():
    state = FeaturesState("skeleton-v1", "continue", warms_up=False)
    a = series("AAAUSDT", 10)
    state.apply(a[:5], NOW)
    impossible = KlineEvent.model_construct(**{**a[5].model_dump(), "high": a[5].low * 0.5})
    out = state.apply(a[3:5] + [impossible] + a[6:], NOW)
    assert out.duplicates == 2
    assert [(e.open_time, "high is below low" in why) for e, why in out.rejected] == [(a[5].open_time, True)]
    assert [p.open_time for p in out.publish] == [e.open_time for e in a[6:]]


def test_bounds_are_what_a_binance_kline_can_carry():
    e = series("AAAUSDT", 1)[0]
    cols = lambda evs: np.array([(x.open_time, x.open, x.high, x.low, x.close, x.volume) for x in evs]).T  # noqa: E731
    ok = [e, poisoned(e, volume=9e19), poisoned(e, low=1e-8, open=1e-8), poisoned(e, high=92233720368.0)]
    assert bounds.beyond(ok, cols(ok)) == {}
    bad = [poisoned(e, volume=1.7e308), poisoned(e, high=1e11), poisoned(e, low=1e-9, open=1e-9),
           poisoned(e, quote_volume=1e300), poisoned(e, trades=2**64)]
    why = bounds.beyond(bad, cols(bad))
    assert sorted(why) == [0, 1, 2, 3, 4]
    assert [w.split(": ")[1].split()[0] for _, w in sorted(why.items())] == ["volume", "high", "open", "quote_volume",
                                                                             "trades"]


# --- the waiting room and the checkpoint position ------------------------------------------------

def ids(n: int, start: int = 1) -> list[str]:
    return [f"{start + i}-0" for i in range(n)]


def test_a_new_keys_candles_wait_and_the_checkpoint_stops_before_them():
    state = FeaturesState("skeleton-v1", "continue", warms_up=True)
    old, new = series("OLDUSDT", 10), series("NEWUSDT", 10)
    state.engine.warmup(("OLDUSDT", "15m"), *history_cols(old[:5]))
    batch = [old[5], new[0], old[6], new[1]]
    ready = state.admit(batch, ids(4, start=10))
    assert ready == [old[5], old[6]]
    assert state.waiting.unrecorded() == {("NEWUSDT", "15m"): "11-0"}
    assert state.admit(batch, ids(4, start=10)) == [old[5], old[6]]  # a retry holds nothing twice
    assert state.waiting.candles([("NEWUSDT", "15m")]) == [new[0], new[1]]
    state.handled("13-0")
    assert state.checkpoint_entry() == "10-18446744073709551615"  # just before 11-0
    state.warm(("NEWUSDT", "15m"), history_cols([]))
    state.warmed(("NEWUSDT", "15m"))  # no history at all: it warms up live
    out = state.release([("NEWUSDT", "15m")], NOW)
    assert [p.open_time for p in out.publish] == [new[0].open_time, new[1].open_time]
    assert state.checkpoint_entry() == "10-18446744073709551615"  # until released
    state.released([("NEWUSDT", "15m")])
    assert state.checkpoint_entry() == "13-0"
    assert state.admit([new[2]], ["14-0"]) == [new[2]]  # warm now: applied at once


def test_a_restore_drops_what_the_snapshot_holds_of_a_waiting_key():
    """A snapshot taken in the middle of a release holds the released key's candles while the
    checkpoint points before them: the restored state must not, or the replay finds them
    duplicates and never publishes them."""
    state = FeaturesState("skeleton-v1", "continue", warms_up=True)
    old, new = series("OLDUSDT", 10), series("NEWUSDT", 30)
    state.engine.warmup(("OLDUSDT", "15m"), *history_cols(old[:5]))
    state.admit([old[5], new[20], new[21]], ids(3, start=10))
    state.handled("12-0")
    state.warm(("NEWUSDT", "15m"), history_cols(new[:20]))
    state.release([("NEWUSDT", "15m")], NOW)  # applied; the publish never happens (a kill)
    saved = state.snapshot()
    assert saved.entry_id == "10-18446744073709551615"

    restarted = FeaturesState("skeleton-v1", "continue", warms_up=True)
    restarted.restore(saved, {("NEWUSDT", "15m"): "11-0"})
    assert restarted.engine.last_open_time(("NEWUSDT", "15m")) is None
    assert restarted.engine.last_open_time(("OLDUSDT", "15m")) == old[4].open_time
    assert restarted.first_candles([new[20], new[21]]) == {("NEWUSDT", "15m"): new[20].open_time}
    restarted.warm(("NEWUSDT", "15m"), history_cols(new[:20]))
    out = restarted.apply([old[5], new[20], new[21]], NOW)
    assert [p.open_time for p in out.publish if p.symbol == "NEWUSDT"] == [new[20].open_time, new[21].open_time]


def test_unusable_history_makes_the_key_cold():
    state = FeaturesState("skeleton-v1", "continue", warms_up=True)
    new = series("NEWUSDT", 10)
    cols = list(history_cols(new[:5]))
    cols[4] = cols[4].copy()
    cols[4][2] = np.nan
    with pytest.raises(Exception):
        state.warm(("NEWUSDT", "15m"), tuple(cols))
    assert ("NEWUSDT", "15m") in state.cold
    assert state.engine.last_open_time(("NEWUSDT", "15m")) is None
    assert not state.needs_history(("NEWUSDT", "15m"))


def history_cols(events: list[KlineEvent]) -> tuple:
    return tuple(np.array([getattr(e, c) for e in events], dtype=np.int64 if c == "open_time" else np.float64)
                 for c in ("open_time", "open", "high", "low", "close", "volume"))
