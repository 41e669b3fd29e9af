"""Intervals and the range/volatility forecaster, served: packages trained here by the real trainer
(tiny runs on tests/data/klines), run in onnxruntime by the service, checked against the trainer's
own band on the same rows, against the graph's own ``quantiles`` output and against numpy.
Live scoring of coverage through the engine; the feature-origin refusal."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from libs.common.telemetry import ServiceMetrics
from services.inference.model_runner import OnnxModel
from services.inference.package import load_package
from services.inference.server import Callables, Config, Inference, load_model
from tests.candles import BTC_15M, load
from tests.services.inference.models import feature_events, publish
from tests.services.inference.harness import until

KLINES = str(BTC_15M)


class Sink:
    def __init__(self) -> None:
        self.events: list = []
        self.scores: list = []
        self.dead: list[str] = []

    async def publish(self, events, *key) -> None:
        self.events.extend(events)

    async def publish_scores(self, events, *key) -> None:
        self.scores.extend(events)

    async def publish_alerts(self, events, *key) -> None:
        pass

    async def dead_letter(self, source, raw, reason) -> None:
        self.dead.append(reason)


def engine(sink: Sink, registry: CollectorRegistry | None = None) -> Inference:
    return Inference(Config(), ServiceMetrics("inference", registry or CollectorRegistry()),
                     Callables(sink.publish, sink.publish_scores, sink.publish_alerts, sink.dead_letter))



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A range-vol package and a (tiny, untuned) lstm-close package with a volatility-scaled band,
    both made by the trainer's real code path from the same real candles."""
    from services.trainer.datasets import BuildSpec, build_dataset
    from services.trainer.jobs import TrainOptions, run_training

    root = tmp_path_factory.mktemp("trained")
    build_dataset(BuildSpec(kind="range-vol", inputs=[KLINES], out=root / "rv", train_fraction=0.6,
                            validation_fraction=0.1))
    rv = run_training(root / "rv", TrainOptions(registry=str(root / "reg"), device="cpu"))
    build_dataset(BuildSpec(kind="lstm-close", inputs=[KLINES], out=root / "lc"))
    lc = run_training(root / "lc", TrainOptions(registry=str(root / "reg"), epochs=1, max_batches=3, device="cpu"))
    return dict(root=root, range=Path(rv.published.uri), lstm=Path(lc.published.uri), lstm_dataset=root / "lc")


def hlc_windows(ends: list[int], lookback: int = 64) -> tuple[np.ndarray, np.ndarray]:
    c = load(BTC_15M)
    hlc = np.stack([c.high, c.low, c.close], axis=1)
    return np.stack([hlc[i - lookback + 1: i + 1] for i in ends]), c.close


def test_a_range_vol_package_serves_range_and_rvol_with_the_graphs_own_band(trained, tmp_path):
    import onnxruntime as ort

    spec = load_package(str(trained["range"]), None, tmp_path)
    assert spec.kind == "range-vol"
    model = OnnxModel(spec)
    model.warm()
    ends = [100, 1500, 2990]
    w, _ = hlc_windows(ends)
    got = model.predict(w, w[:, -1, 2])
    # The graph itself (the trainer's export) computes forecast and 10/50/90 % levels.
    forecast, quantiles = ort.InferenceSession(str(trained["range"] / "model.onnx")).run(None, {"features": w})
    cfg = json.loads((trained["range"] / "klinebus.json").read_text())["config"]["intervals"]
    q = np.asarray(cfg["log_residual_quantiles"])
    qp = np.asarray(cfg["persistence_log_residual_quantiles"])
    for k, f in enumerate(got):
        assert f.target == "range" and f.close is None
        assert f.predicted == {"range": pytest.approx(forecast[k, 0], rel=1e-12),
                               "rvol16": pytest.approx(forecast[k, 1], rel=1e-12)}
        for j, col in enumerate(("range@1", "rvol@16")):
            levels = [f.quantiles[col][key] for key in ("0.1", "0.5", "0.9")]
            np.testing.assert_allclose(levels, quantiles[k, j], rtol=1e-12)
            np.testing.assert_allclose(levels, forecast[k, j] * np.exp(q[j]), rtol=1e-12)
        # Persistence (the trainer's baseline), by hand from the window: last range; realised vol of the last 16 returns.
        last_range = w[k, -1, 0] - w[k, -1, 1]
        r = np.diff(np.log(w[k, :, 2]))[-16:]
        rvol = math.sqrt(float(np.sum(r * r)))
        rng, vol = f.steps
        assert (rng.target, rng.horizon, vol.target, vol.horizon) == ("range", 1, "rvol16", 16)
        assert rng.baseline == pytest.approx(last_range, rel=1e-12) and vol.baseline == pytest.approx(rvol, rel=1e-12)
        assert (rng.lower, rng.upper) == (pytest.approx(quantiles[k, 0, 0], rel=1e-12), pytest.approx(quantiles[k, 0, 2], rel=1e-12))
        assert rng.baseline_lower == pytest.approx(last_range * math.exp(qp[0, 0]), rel=1e-12)
        assert vol.baseline_upper == pytest.approx(rvol * math.exp(qp[1, 2]), rel=1e-12)


def test_the_served_scaled_band_equals_the_trainers_band_on_the_same_rows(trained, tmp_path):
    """The trainer scales the sequence model's band by the window's recent range; serving must
    apply the same scale from the same window: equal to the trainer's band row by row, and the
    same test-slice coverage the trainer recorded in the package."""
    from services.trainer.datasets.sequence import SequenceDataset
    from services.trainer.jobs import onnx_predict, vol_scale

    folder = trained["lstm"]
    meta = json.loads((folder / "klinebus.json").read_text())
    cfg = meta["config"]["intervals"]
    assert cfg["scale"]["candles"] == 16
    spec = load_package(str(folder), None, tmp_path)
    # The trainer calibrated on the float graph: parity is checked on it. The int8 variant served
    # by default moves forecasts within the export's accuracy gate (checked below and in
    # test_model_runner_speed), not to 1e-12.
    model = OnnxModel(spec, variant="float")
    ds = SequenceDataset(trained["lstm_dataset"])
    test = ds.split("test")
    L, features = meta["lookback"], meta["features"]
    idx = np.arange(len(test))
    windows = test.raw_features[test.window_index(idx, L)]
    served = model.predict(windows, test.last_close)
    default = OnnxModel(spec).predict(windows, test.last_close)
    for f, d in zip(served, default):
        for col, levels in f.quantiles.items():
            np.testing.assert_allclose([d.quantiles[col][k] for k in levels], list(levels.values()), rtol=1e-3)

    # The trainer's band for these rows, from the trainer's functions and the quantiles it stored.
    pred = onnx_predict(folder / "model.onnx", test, L)  # [n, 7, 1]
    st = vol_scale(test, features, L)
    q = np.asarray(cfg["log_residual_quantiles"])  # [7, 3]
    actual_close = test.future_prices[:, :, 3]
    for k, col in enumerate(cfg["columns"]):
        lo_t = pred[:, k, 0] * np.exp(q[k, 0] * st)
        hi_t = pred[:, k, 0] * np.exp(q[k, 2] * st)
        lo_s = np.array([f.quantiles[col]["0.1"] for f in served])
        hi_s = np.array([f.quantiles[col]["0.9"] for f in served])
        np.testing.assert_allclose(lo_s, lo_t, rtol=1e-12)
        np.testing.assert_allclose(hi_s, hi_t, rtol=1e-12)
        a = actual_close[:, k]
        coverage = float(np.mean((a >= lo_s) & (a <= hi_s)))
        assert coverage == meta["evaluation"]["intervals"][col]["model"]["coverage"]
    # The scored steps carry the same band, and persistence's empirical band on the last close.
    qp = np.asarray(cfg["persistence_log_residual_quantiles"])
    f0, lc0 = served[0], test.last_close[0]
    assert [s.horizon for s in f0.steps] == list(range(1, 8))
    assert f0.steps[0].lower == f0.quantiles["close@1"]["0.1"]
    assert f0.steps[6].baseline_upper == pytest.approx(lc0 * math.exp(qp[6, 2]), rel=1e-12)


async def test_live_scores_report_range_coverage_beside_persistences_band(trained, tmp_path):
    sink = Sink()
    reg = CollectorRegistry()
    eng = engine(sink, reg)
    spec = load_package(str(trained["range"]), None, tmp_path)
    model = await asyncio.to_thread(load_model, spec)
    eng.install(model)
    eng.needs_capacity(64)
    eng.start()
    events = feature_events(330, feature_set="all-v1")
    try:
        for ev in events:
            eng.on_features(ev)
        # Every warm window from the 64th warm candle on is forecast; scores for range@1 follow one candle later.
        first_warm = next(i for i, e in enumerate(events) if e.warm)
        n_forecasts = len(events) - (first_warm + 63)
        await until(lambda: len(sink.events) == n_forecasts
                    and sum(s.target == "range" for s in sink.scores) == n_forecasts - 1)
        await eng.drain(10)
    finally:
        await eng.stop()
    by_time = {e.open_time: e for e in sink.events}
    pred = sink.events[0]
    assert pred.target == "range" and set(pred.predicted) == {"range", "rvol16"}
    assert set(pred.quantiles) == {"range@1", "rvol@16"} and pred.path is None
    c = load(BTC_15M)
    row = {int(t): i for i, t in enumerate(c.open_time)}
    ranges = [s for s in sink.scores if s.target == "range"]
    inside = []
    for s in ranges:
        p = by_time[s.forecast_open_time]
        i = row[s.open_time]
        assert s.actual_close == pytest.approx(c.high[i] - c.low[i], rel=1e-12)  # the target candle's range
        assert s.predicted_close == p.predicted["range"]
        assert (s.lower, s.upper) == (p.quantiles["range@1"]["0.1"], p.quantiles["range@1"]["0.9"])
        inside.append(p.quantiles["range@1"]["0.1"] <= c.high[i] - c.low[i] <= p.quantiles["range@1"]["0.9"])
        assert s.covered == inside[-1]
        assert s.baseline_close == pytest.approx(c.high[row[s.forecast_open_time]] - c.low[row[s.forecast_open_time]], rel=1e-12)
        assert s.band_width == pytest.approx((s.upper - s.lower) / s.predicted_close, rel=1e-12)
    last = ranges[-1]
    window = inside[-100:]  # the default rolling window
    assert last.interval_window == len(window)
    assert last.rolling_coverage == pytest.approx(sum(window) / len(window), rel=1e-12)
    assert last.rolling_baseline_coverage is not None and last.rolling_baseline_band_width > 0
    # rvol16 at 16 candles ahead, by hand from the closes.
    vols = [s for s in sink.scores if s.target == "rvol16"]
    assert len(vols) == n_forecasts - 16
    v = vols[0]
    i0 = row[v.forecast_open_time]
    r = np.diff(np.log(c.close[i0: i0 + 17]))
    assert v.horizon == 16 and v.actual_close == pytest.approx(math.sqrt(float(np.sum(r * r))), rel=1e-12)
    # Prometheus: the rolling coverage gauge is the last score's.
    got = reg.get_sample_value("klinebus_inference_score_interval_coverage",
                               {"model": spec.name, "symbol": "BTCUSDT", "interval": "15m", "horizon": "1", "target": "range"})
    assert got == pytest.approx(last.rolling_coverage)


def origin_package(registry: Path, tmp: Path, name: str, origin: int, cumulative: bool):
    features = ("close", "obv") if cumulative else ("close", "sma_20")
    return publish(registry, tmp, name, features=features, lookback=3, feature_set="all-v1", config=dict(
        dataset=dict(cumulative_features=["obv"] if cumulative else [],
                     series=[dict(symbol="BTCUSDT", interval="15m", feature_origin=origin)])))


async def test_a_window_from_another_feature_origin_is_refused_for_cumulative_features(tmp_path, caplog):
    events = feature_events(260, feature_set="all-v1")
    origin = events[0].open_time
    registry = tmp_path / "registry"
    cum = origin_package(registry, tmp_path, "cum", origin, cumulative=True)
    free = origin_package(registry, tmp_path, "free", origin, cumulative=False)
    for elsewhere, want_cum in ((origin, True), (origin + 15 * 60_000, False)):
        sink, reg = Sink(), CollectorRegistry()
        eng = engine(sink, reg)
        for built in (cum, free):
            eng.install(await asyncio.to_thread(load_model, load_package(built.published.uri, built.published.sha256, tmp_path / "c")))
        eng.needs_capacity(3)
        eng.start()
        warm = [e.model_copy(update={"feature_origin": elsewhere}) for e in events if e.warm][:10]
        caplog.clear()
        try:
            with caplog.at_level(logging.ERROR, logger="klinebus.inference"):
                for ev in warm:
                    eng.on_features(ev)
                await until(lambda: sum(e.model == "free" for e in sink.events) == 8)
                await eng.drain(10)
        finally:
            await eng.stop()
        assert sum(e.model == "cum" for e in sink.events) == (8 if want_cum else 0)
        refused = reg.get_sample_value("klinebus_inference_feature_origin_mismatches_total",
                                       {"model": "cum", "symbol": "BTCUSDT", "interval": "15m"})
        skipped = reg.get_sample_value("klinebus_inference_skipped_total", {"model": "cum", "reason": "feature_origin_mismatch"})
        lines = [r.getMessage() for r in caplog.records if "refuses" in r.getMessage()]
        if want_cum:
            assert refused is None and skipped is None and lines == []
        else:
            assert refused == 10 and skipped == 10
            assert len(lines) == 1 and "cum@1" in lines[0] and str(origin) in lines[0] and str(elsewhere) in lines[0]


def test_the_scorer_judges_bands_by_hand_and_skips_realised_vol_over_a_gap():
    from services.inference.model_runner import Step
    from services.inference.scoring import LiveScorer

    m = 900_000
    s = LiveScorer(window=3)
    s.add_truth("X", "15m", 0, 100.0, 101.0, 99.0)
    steps = [Step("range", 1, 2.0, 2.0, 1.0, 3.0, 0.5, 4.0), Step("rvol2", 2, 0.01, 0.02, 0.005, 0.05)]
    assert s.add_forecast("m", "1", "X", "15m", 0, 100.0, [(1, m, 2.0), (2, 2 * m, 0.01)], steps) == []
    (r,) = s.add_truth("X", "15m", m, 101.0, 104.0, 100.5)  # range 3.5: outside [1, 3], inside persistence's [0.5, 4]
    assert (r.target, r.actual, r.covered, r.baseline_covered) == ("range", 3.5, False, True)
    assert r.band_width == 1.0 and r.baseline_band_width == 1.75 and r.coverage == 0.0 and r.baseline_coverage == 1.0
    (v,) = s.add_truth("X", "15m", 2 * m, 99.0, 101.0, 98.0)
    want = math.sqrt(math.log(101 / 100) ** 2 + math.log(99 / 101) ** 2)
    assert v.target == "rvol2" and v.actual == pytest.approx(want, rel=1e-15) and v.covered is True
    assert v.baseline_lower is None and v.baseline_covered is None and v.baseline_coverage is None
    # A missing candle between forecast and target: no realised vol, no score (never a wrong one).
    s.add_forecast("m", "1", "X", "15m", 2 * m, 99.0, [(2, 4 * m, 0.01)], [Step("rvol2", 2, 0.01, 0.02)])
    assert s.add_truth("X", "15m", 4 * m, 99.5) == []


async def test_a_range_forecast_read_back_after_a_restart_is_scored_as_without_the_restart(trained, tmp_path):
    """A range-vol forecast waiting for its targets when the service restarts: read back from
    predictions.v1, with persistence's range and realised vol worked out from the candles the
    restart replayed, it gets the scores the uninterrupted run gave (range@1 and rvol16)."""
    spec = load_package(str(trained["range"]), None, tmp_path)
    events = feature_events(330, feature_set="all-v1")
    k = 280  # the restart comes after candle k; the forecast made at k waits for k+1 and k+16
    first_warm = next(i for i, e in enumerate(events) if e.warm)

    async def run(evs) -> tuple[Sink, Inference]:
        sink = Sink()
        eng = engine(sink)
        eng.install(await asyncio.to_thread(load_model, spec))
        eng.needs_capacity(64)
        eng.start()
        for ev in evs:
            eng.on_features(ev)
        n = len(evs) - (first_warm + 63)
        await until(lambda: len(sink.events) == n)
        await eng.drain(10)
        return sink, eng

    whole, eng = await run(events)
    await eng.stop()
    forecast_at = events[k].open_time
    want = {s.target: s for s in whole.scores if s.forecast_open_time == forecast_at}
    assert set(want) == {"range", "rvol16"}
    doc = next(e for e in whole.events if e.open_time == forecast_at).model_dump(mode="json")

    # The restart: windows and candles rebuilt from features.v1 up to k, no forecast made again.
    sink = Sink()
    eng = engine(sink)
    eng.install(await asyncio.to_thread(load_model, spec))
    eng.needs_capacity(64)
    eng.start()
    try:
        eng.replay(events[:k + 1], {f"BTCUSDT|15m|{spec.name}": forecast_at})
        eng.restore_pending(doc, last=forecast_at)
        assert eng.scorer.pending == 2
        for ev in events[k + 1:]:
            eng.on_features(ev)
        await until(lambda: sum(s.forecast_open_time == forecast_at for s in sink.scores) == 2)
        await eng.drain(10)
    finally:
        await eng.stop()
    got = {s.target: s for s in sink.scores if s.forecast_open_time == forecast_at}
    fields = ("open_time", "horizon", "predicted_close", "actual_close", "baseline_close", "lower", "upper",
              "covered", "baseline_lower", "baseline_upper", "baseline_covered")
    for target in ("range", "rvol16"):
        assert [getattr(got[target], f) for f in fields] == [getattr(want[target], f) for f in fields], target
    assert got["range"].baseline_lower is not None  # the package's persistence band came back too


async def test_a_forecast_read_back_after_a_restart_keeps_its_interval_and_persistences(trained, tmp_path):
    eng = engine(Sink())
    spec = load_package(str(trained["lstm"]), None, tmp_path)
    eng.install(await asyncio.to_thread(load_model, spec))
    qp = json.loads((trained["lstm"] / "klinebus.json").read_text())["config"]["intervals"]["persistence_log_residual_quantiles"]
    m = 900_000
    doc = dict(symbol="BTCUSDT", interval="15m", open_time=0, model=spec.name, model_version=spec.version,
               target_open_time=m, horizon=1, horizons=[1, 2], target_open_times=[m, 2 * m], path=[100.5, 101.0],
               predicted={"close": 100.5}, last_close=100.0, target="price",
               quantiles={"close@1": {"0.1": 99.0, "0.5": 100.4, "0.9": 102.0}, "close@2": {"0.1": 98.0, "0.5": 101.0, "0.9": 103.0}})
    eng.restore_pending(doc, last=m)  # close@1 already closed before the restart: only close@2 waits
    assert eng.scorer.pending == 1
    (s,) = eng.scorer.add_truth("BTCUSDT", "15m", 2 * m, 103.5)
    assert (s.horizon, s.lower, s.upper, s.covered) == (2, 98.0, 103.0, False)
    assert s.baseline_lower == pytest.approx(100.0 * math.exp(qp[1][0]), rel=1e-12)
    assert s.baseline_upper == pytest.approx(100.0 * math.exp(qp[1][2]), rel=1e-12)
