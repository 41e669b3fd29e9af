"""The inference engine: features in; forecasts, scores and market alerts out. No bus here.

The app hands it each ``features.v1`` event (``on_features``) and each model announcement
(``install``); it reaches the bus only through the ``Port`` it was given (publish three
topics, write a dead letter, say whether an error is transient). Per event it
updates the stream's window, scores the forecasts that targeted this candle, evaluates the
feature alert rules, and submits one job per routed model to that model's micro-batcher,
without waiting for any model: each model answers on its own task and thread, in order.

Restart: ``replay`` feeds earlier features events through the same path with publishing
limited to the candles a model had not published yet (the once-per-candle guard's record),
so a crash between acknowledging a candle and publishing its forecast loses nothing, and the
first forecast after a restart comes from the same window an uninterrupted run had.

Partitions: a replica holds state only for the streams of the partitions it owns. ``settle``
waits until nothing is owed for a set of streams (forecasts queued or in a session, events
queued in an outbox), ``forget`` drops those streams' windows, scores and metric series; the app
calls both when a partition goes to another replica.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence

import numpy as np

from libs.common import topics
from libs.common.contracts import AlertEvent, FeaturesEvent, PredictionEvent, ScoreEvent
from libs.common.klines import interval_ms, now_ms
from libs.common.telemetry import ServiceMetrics
from services.inference.alert_rules import AlertEngine, Firing, Rule
from services.inference.batching import Job, MicroBatcher, Outbox, connection_trouble
from services.inference.model_runner import OnnxModel, Step, persistence_rvol
from services.inference.package import ModelSpec
from services.inference.routing import Router
from services.inference.scoring import LiveScorer, Score
from services.inference.windows import MISMATCH, Key, Request, Windows

ORIGIN_MISMATCH = "feature_origin_mismatch"  # skipped reason: features computed from another first candle

log = logging.getLogger("klinebus.inference")

Publish = Callable[..., Awaitable[Any]]
DeadLetter = Callable[[str, Any, str], Awaitable[None]]
Belongs = Callable[[Key], bool]


class Port(Protocol):
    """All the engine needs of the bus; the app's edge implements it (tests: a list per topic).

    ``publish_*(events, *key)`` appends events of one key in order (once per candle);
    ``dead_letter(source, raw, reason)`` records what cannot be served; ``transient(exc)`` says
    whether a failure is the infrastructure's (waited out, nothing dropped) rather than the
    item's (tried a bounded number of times, then dead-lettered)."""

    async def publish_predictions(self, events: Sequence[PredictionEvent], *key: str) -> Any: ...

    async def publish_scores(self, events: Sequence[ScoreEvent], *key: str) -> Any: ...

    async def publish_alerts(self, events: Sequence[AlertEvent], *key: str) -> Any: ...

    async def dead_letter(self, source: str, raw: Any, reason: str) -> None: ...

    def transient(self, exc: BaseException) -> bool: ...


@dataclass
class Callables:
    """A ``Port`` from plain callables (benchmarks, tests)."""

    publish_predictions: Publish
    publish_scores: Publish
    publish_alerts: Publish
    dead_letter: DeadLetter
    transient: Callable[[BaseException], bool] = connection_trouble


@dataclass
class Config:
    max_batch: int = 64
    max_wait_ms: float = 2.0
    session_threads: int = 1
    score_window: int = 100
    behind_min_samples: int = 30
    behind_ratio: float = 1.0
    demote_behind: bool = False
    session_calls: int = 2


class ServedModel:
    """A loaded, warmed model and the column request its windows are cut with."""

    def __init__(self, spec: ModelSpec, runner: Any) -> None:
        self.spec = spec
        self.runner = runner
        self.request = Request(spec.feature_set, spec.features, spec.lookback)
        self.loaded_at = time.time()

    def predict(self, windows, last_close):
        return self.runner.predict(windows, last_close)


def load_model(spec: ModelSpec, threads: int = 1, variant: str = "auto") -> ServedModel:
    """Open and warm a session (blocking: run it in a thread); ``PackageError`` when it cannot serve."""
    runner = OnnxModel(spec, threads, variant)
    runner.warm()
    return ServedModel(spec, runner)


class Metrics:
    def __init__(self, m: ServiceMetrics) -> None:
        self.predictions = m.counter("predictions_total", "Forecasts published", ["model"])
        self.skipped = m.counter(
            "skipped_total", "Candles a model gave no forecast for, by reason "
            "(not_warm, too_few_candles, gap, feature_set_mismatch, feature_origin_mismatch)", ["model", "reason"])
        self.origin_mismatches = m.counter(
            "feature_origin_mismatches_total", "features.v1 events refused for a model with cumulative features "
            "because they were computed from another origin than the model was trained from", ["model", "symbol", "interval"])
        self.origin_unknown = m.counter(
            "feature_origin_unknown_total", "Streams a model with cumulative features serves without a known origin "
            "(counted once per stream)", ["model"])
        self.mismatches = m.counter(
            "feature_set_mismatches_total", "features.v1 events whose feature set lacks a routed model's inputs",
            ["model", "feature_set"])
        self.model_errors = m.counter("model_errors_total", "Session calls that failed or answered wrongly", ["model"])
        self.load_failures = m.counter("model_load_failures_total", "Model packages refused (verify or load failed)", ["model"])
        self.loads = m.counter("model_loads_total", "Model versions loaded and swapped in", ["model"])
        self.batch = m.histogram("batch_size", "Windows per session call", ["model"],
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.session = m.histogram("session_seconds", "Time of one session call", ["model"],
                                   buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.close_to_publish = m.histogram(
            "close_to_publish_seconds", "From a candle's close (open_time + interval) to its forecast's publish", ["model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.last_prediction = m.gauge(
            "last_prediction_timestamp_seconds", "When each model last published a forecast (model stale: old)", ["model"])
        self.model_info = m.gauge("model_info", "1 for the version each model name serves now", ["model", "version", "kind"])
        self.queue = m.gauge("queue_windows", "Windows waiting for their model", ["model"])
        self.score_mae = m.gauge("score_mae", "Rolling MAE of the forecast close", ["model", "symbol", "interval", "horizon"])
        self.score_base = m.gauge("score_baseline_mae", "Rolling MAE of persistence on the same candles",
                                  ["model", "symbol", "interval", "horizon"])
        self.score_ratio = m.gauge("score_mae_ratio", "Rolling MAE / persistence's (above 1: behind persistence)",
                                   ["model", "symbol", "interval", "horizon"])
        self.score_hits = m.gauge("score_direction_accuracy", "Rolling directional hit rate (flat candles left out)",
                                  ["model", "symbol", "interval", "horizon"])
        self.score_n = m.gauge("score_samples", "Scores in the rolling window", ["model", "symbol", "interval", "horizon"])
        labels = ["model", "symbol", "interval", "horizon", "target"]
        self.score_coverage = m.gauge("score_interval_coverage", "Rolling share of actuals inside the 80 % interval "
                                      "(target 0.8)", labels)
        self.score_width = m.gauge("score_interval_width_ratio", "Rolling mean 80 % interval width / forecast", labels)
        self.score_base_coverage = m.gauge(
            "score_baseline_interval_coverage", "Rolling coverage of persistence's empirical 80 % interval", labels)
        self.score_base_width = m.gauge(
            "score_baseline_interval_width_ratio", "Rolling mean width / persistence of its empirical 80 % interval", labels)
        self.interval_scores = m.counter("interval_scores_total", "Scored 80 % intervals, by outcome (inside, outside)",
                                         ["model", "target", "outcome"])
        self.behind = m.gauge("model_behind_persistence",
                              "1 while a model's rolling MAE is behind persistence over the agreed window",
                              ["model", "symbol", "interval"])
        self.alerts = m.counter("alerts_total", "Market alert transitions published", ["rule", "status"])
        self.worker_restarts = m.counter(
            "worker_restarts_total", "Restarts of a model's batcher or a topic's outbox after a failure", ["worker"])
        self.worker_failing = m.gauge(
            "worker_failing", "1 while a batcher or outbox is failing and restarting (see /readyz)", ["worker"])
        self.given_up = m.counter(
            "poison_events_total", "Items dead-lettered after failing every try (they no longer block the worker)",
            ["worker"])


class Inference:
    def __init__(self, config: Config, metrics: ServiceMetrics, port: Port, rules: Sequence[Rule] = ()) -> None:
        self.config = config
        self.m = Metrics(metrics)
        self.router = Router()
        self.windows = Windows(1)
        self.scorer = LiveScorer(config.score_window, config.behind_min_samples, config.behind_ratio)
        self.alerts = AlertEngine(rules)
        self.port = port
        self.batchers: dict[str, MicroBatcher] = {}
        # Per stream: forecasts submitted and events put in an outbox, not yet answered/published.
        # A partition handed to another replica waits for its streams' count to reach 0 (``settle``).
        self._owed: Counter[Key] = Counter()
        self.out_predictions = self._outbox("predictions", topics.PREDICTIONS, self._published)
        self.out_scores = self._outbox("scores", topics.SCORES, self._paying(port.publish_scores))
        self.out_alerts = self._outbox("alerts", topics.ALERTS, self._paying(port.publish_alerts))
        # Score gauge series per stream, removed when the stream goes to another replica (else two
        # replicas export one series, the gone one frozen).
        self._series: dict[Key, set[tuple[str, ...]]] = {}
        # Labelled metric children, looked up once (``labels()`` costs microseconds, paid several
        # times per forecast and score); a stream's entries go with its series in ``forget``.
        self._kids: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._mismatch_logged: set[tuple[str, str]] = set()
        self._origin_logged: set[tuple] = set()
        # During replay: per "symbol|interval|model", publish only candles after this open time.
        self._replay_floor: dict[str, int] | None = None
        self._started = False

    # --- workers ------------------------------------------------------------------------------

    def _outbox(self, name: str, topic: str, publish: Publish) -> Outbox:
        async def give_up(event: Any, reason: str) -> None:
            self.m.given_up.labels(f"outbox:{name}").inc()
            await self.port.dead_letter(topic, event.model_dump(mode="json"), f"unpublishable after every try: {reason}")
            self._paid((event.symbol, event.interval))

        out = Outbox(f"outbox:{name}", publish, give_up=give_up, transient=self.port.transient,
                     on_restart=self._restarted)
        self.m.worker_failing.labels(out.name).set_function(lambda: 0 if out.ok else 1)
        return out

    def _batcher(self, name: str) -> MicroBatcher:
        async def give_up(job: Job, reason: str) -> None:
            self.m.given_up.labels(f"batcher:{name}").inc()
            await self.port.dead_letter(topics.FEATURES, _job_doc(job), f"forecast failed every try: {reason}")
            self._paid((job.symbol, job.interval))

        b = MicroBatcher(f"batcher:{name}", self._on_result, self.config.max_batch, self.config.max_wait_ms / 1000.0,
                         on_session=self._on_session, give_up=give_up, transient=self.port.transient,
                         on_restart=self._restarted, calls=self.config.session_calls)
        self.m.queue.labels(name).set_function(lambda: b.pending)
        self.m.worker_failing.labels(b.name).set_function(lambda: 0 if b.ok else 1)
        return b

    def _restarted(self, worker: str, exc: BaseException) -> None:
        self.m.worker_restarts.labels(worker).inc()

    def workers(self) -> list[MicroBatcher | Outbox]:
        return [*self.batchers.values(), self.out_predictions, self.out_scores, self.out_alerts]

    def failing(self) -> dict[str, str]:
        """Workers down now (restarting) and why; empty when all work."""
        return {w.name: w.failing or "stopped" for w in self.workers() if not w.ok}

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        for out in (self.out_predictions, self.out_scores, self.out_alerts):
            out.start()
        for b in self.batchers.values():
            b.start()

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for b in list(self.batchers.values()):
            await b.drain(max(0.0, deadline - time.monotonic()))
        ok = True
        for out in (self.out_predictions, self.out_scores, self.out_alerts):
            ok = await out.drain(max(0.0, deadline - time.monotonic())) and ok
        return ok and not any(b.pending for b in self.batchers.values())

    async def stop(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        for out in (self.out_predictions, self.out_scores, self.out_alerts):
            await out.stop()

    async def _published(self, events: Sequence[PredictionEvent], *key: str) -> None:
        await self.port.publish_predictions(events, *key)
        now = now_ms()
        for e in events:  # measured once the forecast is on the stream
            self._kid(self.m.close_to_publish, (e.model,)).observe(max(0.0, (now - e.open_time - interval_ms(e.interval)) / 1000.0))
            self._paid((e.symbol, e.interval))

    def _paying(self, publish: Publish) -> Publish:
        async def publish_and_pay(events: Sequence[Any], *key: str) -> Any:
            got = await publish(events, *key)
            for e in events:
                self._paid((e.symbol, e.interval))
            return got

        return publish_and_pay

    def _paid(self, key: Key) -> None:
        n = self._owed[key] - 1
        if n > 0:
            self._owed[key] = n
        else:
            self._owed.pop(key, None)

    def owed(self, belongs: Belongs) -> int:
        return sum(n for k, n in self._owed.items() if belongs(k))

    async def settle(self, belongs: Belongs, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until every forecast of the selected streams was answered
        and every event of theirs was published; True when none is owed."""
        deadline = time.monotonic() + timeout
        while self.owed(belongs) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return not self.owed(belongs)

    def forget(self, belongs: Belongs) -> list[Key]:
        """Drop the selected streams' windows, live scores and score series (a partition another
        replica owns now). Returns the streams whose windows were dropped."""
        keys = [k for k in self.windows.keys() if belongs(k)]
        for k in keys:
            self.windows.drop(k)
        self.scorer.forget(belongs)
        for stream in [s for s in self._series if belongs(s)]:
            for labels in self._series.pop(stream):
                for gauge in self._gauges_of(labels):
                    self._kids.pop((id(gauge), labels), None)
                    try:
                        gauge.remove(*labels)
                    except KeyError:
                        pass  # never set for this series
        return keys

    def _kid(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """``metric.labels(*labels)``, cached."""
        k = (id(metric), labels)
        c = self._kids.get(k)
        if c is None:
            c = self._kids[k] = metric.labels(*labels)
        return c

    def _gauges_of(self, labels: tuple[str, ...]) -> list[Any]:
        m = self.m
        if len(labels) == 3:
            return [m.behind]
        if len(labels) == 4:
            return [m.score_mae, m.score_base, m.score_ratio, m.score_hits, m.score_n]
        return [m.score_coverage, m.score_width, m.score_base_coverage, m.score_base_width]

    # --- models -------------------------------------------------------------------------------

    def install(self, model: ServedModel) -> ServedModel | None:
        """Serve ``model`` from the next candle on (between two candles: the event loop runs one
        handler at a time); queued windows still run on the version they were queued for."""
        spec = model.spec
        old = self.router.put(model)
        if spec.name not in self.batchers:
            b = self.batchers[spec.name] = self._batcher(spec.name)
            if self._started:
                b.start()
        if old is not None:
            self.m.model_info.remove(old.spec.name, old.spec.version, old.spec.kind)
        self.m.model_info.labels(spec.name, spec.version, spec.kind).set(1)
        self.m.loads.labels(spec.name).inc()
        return old

    def needs_capacity(self, lookback: int) -> bool:
        return self.windows.grow(lookback)

    # --- features -----------------------------------------------------------------------------

    def on_features(self, ev: FeaturesEvent) -> bool:
        """Handle one closed candle; False when it is a re-delivery (older or the same candle)."""
        key = (ev.symbol, ev.interval)
        if not self.windows.push(ev.symbol, ev.interval, ev.open_time, ev.close, ev.feature_set, ev.values):
            return False
        iv_ms = interval_ms(ev.interval)
        replaying = self._replay_floor is not None
        for s in self.scorer.add_truth(ev.symbol, ev.interval, ev.open_time, ev.close,
                                       ev.values.get("high"), ev.values.get("low")):
            if not replaying:
                self._emit_score(s)
        if not replaying:
            for f in self.alerts.on_features(ev.symbol, ev.interval, ev.open_time, iv_ms, ev.values):
                self._emit_alert(f)
        for model in self.router.route(ev.symbol, ev.interval):
            spec = model.spec
            if replaying:
                floor = self._replay_floor.get(f"{ev.symbol}|{ev.interval}|{spec.name}")
                if floor is None or ev.open_time <= floor:
                    continue
            if spec.cumulative and not self._origin_ok(spec, ev):
                self._kid(self.m.skipped, (spec.name, ORIGIN_MISMATCH)).inc()
                continue
            window, last_close, reason = self.windows.window(key, model.request)
            if window is None:
                self._kid(self.m.skipped, (spec.name, reason)).inc()
                if reason == MISMATCH:
                    self._mismatch(spec, ev)
                continue
            self.batchers[spec.name].submit(
                Job(model, ev.symbol, ev.interval, ev.open_time, window, last_close,
                    {"kline_ingested_at": ev.kline_ingested_at, "interval_ms": iv_ms})
            )
            self._owed[key] += 1
        return True

    def _mismatch(self, spec: ModelSpec, ev: FeaturesEvent) -> None:
        self.m.mismatches.labels(spec.name, ev.feature_set).inc()
        if (spec.name, ev.feature_set) not in self._mismatch_logged:
            self._mismatch_logged.add((spec.name, ev.feature_set))
            log.error(
                "%s serves %s %s but features.v1 carries %s, which lacks its inputs (%s); no forecast until "
                "the features service publishes %s (counted in klinebus_inference_feature_set_mismatches_total)",
                spec.label, ev.symbol, ev.interval, ev.feature_set, spec.feature_set, spec.feature_set,
            )

    def _origin_ok(self, spec: ModelSpec, ev: FeaturesEvent) -> bool:
        """A model trained on cumulative features (obv, vpt) is served only windows computed from
        the origin it was trained from (``config.dataset.series[].feature_origin``): the same
        indicator from another first candle is offset by the whole history between them.
        Unknown on either side (the producer does not say, or an older package): served, counted."""
        want, have = spec.origins.get((ev.symbol, ev.interval)), ev.feature_origin
        if want is None or have is None:
            if (spec.name, ev.symbol, ev.interval, "unknown") not in self._origin_logged:
                self._origin_logged.add((spec.name, ev.symbol, ev.interval, "unknown"))
                self.m.origin_unknown.labels(spec.name).inc()
                log.warning("%s reads cumulative features %s but the feature origin of %s %s is unknown "
                            "(package: %s, features.v1: %s); serving unchecked", spec.label, ",".join(spec.cumulative),
                            ev.symbol, ev.interval, want, have)
            return True
        if want == have:
            return True
        self.m.origin_mismatches.labels(spec.name, ev.symbol, ev.interval).inc()
        if (spec.name, ev.symbol, ev.interval, have) not in self._origin_logged:
            self._origin_logged.add((spec.name, ev.symbol, ev.interval, have))
            log.error("%s refuses %s %s: its cumulative features (%s) were trained from origin %d but features.v1 "
                      "computes them from %d; no forecast (klinebus_inference_feature_origin_mismatches_total)",
                      spec.label, ev.symbol, ev.interval, ",".join(spec.cumulative), want, have)
        return False

    def restore_pending(self, doc: dict[str, Any], last: int) -> None:
        """A forecast read back from ``predictions.v1`` after a restart whose targets after ``last``
        have not closed yet: waits for them again, with its 80 % interval (from its ``quantiles``) and
        persistence's (from the package, when the same version serves). A range model's forecasts
        are judged beside persistence's range and realised vol, which the event does not carry:
        they are worked out from the candles the restart read back (``_restore_levels``)."""
        if doc.get("target", "price") == "range":
            self._restore_levels(doc, last)
            return
        if doc.get("target", "price") != "price":
            return
        targets = doc.get("target_open_times") or [doc["target_open_time"]]
        path = doc.get("path") or [doc["predicted"].get("close")]
        horizons = doc.get("horizons") or [doc["horizon"]]
        bands = doc.get("quantiles") or {}
        served = self.router.get(doc["model"])
        iv = served.spec.intervals if served is not None and served.spec.version == doc["model_version"] else None
        lc = float(doc["last_close"])
        triples, steps = [], []
        for h, t, p in zip(horizons, targets, path):
            if t <= last or p is None:
                continue
            lo, hi, blo, bhi = _restored_bands(bands, iv, f"close@{h}", lc)
            triples.append((h, t, p))
            steps.append(Step("close", h, float(p), lc, lo, hi, blo, bhi))
        if triples:
            self.scorer.add_forecast(doc["model"], doc["model_version"], doc["symbol"], doc["interval"],
                                     doc["open_time"], lc, triples, steps)

    def _restore_levels(self, doc: dict[str, Any], last: int) -> None:
        """``restore_pending`` for a range/volatility forecast (``predicted``: ``range`` for the next
        candle, ``rvolN`` for the next N): a column whose persistence value cannot be worked out
        from the candles held (a gap) is not restored, as live scoring skips it."""
        symbol, interval, t0 = doc["symbol"], doc["interval"], int(doc["open_time"])
        iv_ms = interval_ms(interval)
        served = self.router.get(doc["model"])
        iv = served.spec.intervals if served is not None and served.spec.version == doc["model_version"] else None
        bands = doc.get("quantiles") or {}
        triples, steps = [], []
        for label, predicted in (doc.get("predicted") or {}).items():
            if label == "range":
                column, horizon = "range", 1
            elif label.startswith("rvol") and label[4:].isdigit():
                column, horizon = "rvol", int(label[4:])
            else:
                continue
            target = t0 + horizon * iv_ms
            # Persistence, as serving worked it out from the window: the forecast candle's range,
            # the realised vol of the N returns up to it.
            rows = self.scorer.held(symbol, interval, t0, 1 if column == "range" else horizon + 1, iv_ms)
            if target <= last or predicted is None or rows is None:
                continue
            if column == "range":
                if rows[-1][1] is None or rows[-1][2] is None:
                    continue
                base = float(rows[-1][1] - rows[-1][2])
            else:
                if min(r[0] for r in rows) <= 0:
                    continue
                base = persistence_rvol(np.array([r[0] for r in rows]))
            lo, hi, blo, bhi = _restored_bands(bands, iv, f"{column}@{horizon}", base)
            triples.append((horizon, target, float(predicted)))
            steps.append(Step(label, horizon, float(predicted), base, lo, hi, blo, bhi))
        if triples:
            self.scorer.add_forecast(doc["model"], doc["model_version"], symbol, interval, t0,
                                     float(doc["last_close"]), triples, steps)

    def rebuild(self, per_key: dict[tuple[str, str], list[FeaturesEvent]], floors: dict[str, int]) -> int:
        """Windows from stored events (per stream, oldest first): a stream whose stored events are
        newer than what it holds (a fresh start, or a standby taking over with stale rows) is
        rebuilt and its unpublished candles forecast; a stream already as current is kept.
        Returns how many streams were rebuilt."""
        stale = []
        for key, evs in per_key.items():
            held = self.windows.last_open_time(key)
            if evs and (held is None or evs[-1].open_time > held):
                self.windows.drop(key)
                stale += evs
        stale.sort(key=lambda e: e.open_time)
        self.replay(stale, floors)
        return len({(e.symbol, e.interval) for e in stale})

    def replay(self, events: Sequence[FeaturesEvent], floors: dict[str, int]) -> None:
        """Rebuild windows from earlier events (oldest first); forecast only candles after each
        model's last published one (``floors``: guard field -> open_time)."""
        self._replay_floor = floors
        try:
            for ev in events:
                self.on_features(ev)
        finally:
            self._replay_floor = None

    # --- results --------------------------------------------------------------------------------

    def _on_session(self, jobs: Sequence[Job]) -> None:
        meta, name = jobs[0].meta, jobs[0].model.spec.name
        if "batch" in meta:
            self.m.batch.labels(name).observe(meta["batch"])
            self.m.session.labels(name).observe(meta["session_s"])
        else:  # the session call failed: one error per job
            self.m.model_errors.labels(name).inc(len(jobs))

    async def _on_result(self, job: Job, res: Any) -> None:
        spec = job.model.spec
        if isinstance(res, Exception):
            # May raise (Redis refusing the write): the batcher keeps this job in hand and tries again.
            reason = f"model {spec.label} failed on {job.symbol} {job.interval} {job.open_time}: {type(res).__name__}: {res}"
            await self.port.dead_letter(topics.FEATURES, _job_doc(job), reason)
        else:
            self._publish_forecast(job, spec, res)
        self._paid((job.symbol, job.interval))

    def _publish_forecast(self, job: Job, spec: ModelSpec, fc: Any) -> None:
        iv_ms = job.meta["interval_ms"]
        targets = [job.open_time + h * iv_ms for h in spec.horizons]
        close = fc.close
        shadow = not spec.promoted or (
            self.config.demote_behind and self.scorer.behind(spec.name, job.symbol, job.interval, spec.horizons[0]))
        now = now_ms()
        lag_ms = now - (job.open_time + iv_ms)
        event = PredictionEvent(
            symbol=job.symbol, interval=job.interval, open_time=job.open_time, model=spec.name,
            model_version=spec.version, target_open_time=targets[0], horizon=spec.horizons[0],
            predicted=fc.predicted, last_close=job.last_close, kline_ingested_at=job.meta.get("kline_ingested_at"),
            predicted_at=now, horizons=list(spec.horizons) if len(spec.horizons) > 1 else None,
            target_open_times=targets if len(targets) > 1 else None, path=fc.path, probabilities=fc.probabilities,
            close_to_publish_ms=lag_ms, role="shadow" if shadow else "primary",
            target=getattr(fc, "target", "price"), quantiles=getattr(fc, "quantiles", None),
        )
        self.out_predictions.put(event, spec.name)
        self._owed[(job.symbol, job.interval)] += 1
        self._kid(self.m.predictions, (spec.name,)).inc()
        self._kid(self.m.last_prediction, (spec.name,)).set(now / 1000.0)
        rich = getattr(fc, "steps", None)
        if rich and spec.kind != "persistence":
            # Each scored column (close per horizon, or range / rvolN) with persistence and both bands.
            steps = [(st.horizon, job.open_time + st.horizon * iv_ms, st.predicted) for st in rich]
            for s in self.scorer.add_forecast(spec.name, spec.version, job.symbol, job.interval, job.open_time,
                                              job.last_close, steps, rich):
                self._emit_score(s)
        if close is None:
            return
        if not rich and spec.kind != "persistence":  # a runner that says only what the close does
            if fc.path and len(fc.path) == len(spec.horizons):
                steps = list(zip(spec.horizons, targets, fc.path))
            else:
                steps = [(spec.horizons[0], targets[0], close)]
            for s in self.scorer.add_forecast(spec.name, spec.version, job.symbol, job.interval, job.open_time,
                                              job.last_close, steps):
                self._emit_score(s)
        for f in self.alerts.on_forecast(spec.name, job.symbol, job.interval, job.open_time, iv_ms, job.last_close, close):
            self._emit_alert(f)

    def _emit_score(self, s: Score) -> None:
        labels = (s.model, s.symbol, s.interval, str(s.horizon))
        series = self._series.setdefault((s.symbol, s.interval), set())
        series.add(labels)
        series.add((s.model, s.symbol, s.interval))
        m, kid = self.m, self._kid
        kid(m.score_mae, labels).set(s.mae)
        kid(m.score_base, labels).set(s.baseline_mae)
        if s.mae_ratio is not None:
            kid(m.score_ratio, labels).set(s.mae_ratio)
        if s.direction_accuracy is not None:
            kid(m.score_hits, labels).set(s.direction_accuracy)
        kid(m.score_n, labels).set(s.n)
        if s.covered is not None:
            tl = (*labels, s.target)
            series.add(tl)
            kid(m.interval_scores, (s.model, s.target, "inside" if s.covered else "outside")).inc()
            if s.coverage is not None:
                kid(m.score_coverage, tl).set(s.coverage)
                kid(m.score_width, tl).set(s.mean_band_width)
            if s.baseline_coverage is not None:
                kid(m.score_base_coverage, tl).set(s.baseline_coverage)
                kid(m.score_base_width, tl).set(s.baseline_mean_band_width)
        if s.horizon == self.scorer_horizon(s.model):
            kid(m.behind, (s.model, s.symbol, s.interval)).set(1 if s.behind else 0)
        self.out_scores.put(
            ScoreEvent(
                symbol=s.symbol, interval=s.interval, open_time=s.target_open_time, model=s.model,
                model_version=s.model_version, horizon=s.horizon, forecast_open_time=s.open_time,
                predicted_close=s.predicted, actual_close=s.actual, baseline_close=s.baseline, abs_error=s.abs_error,
                baseline_abs_error=s.baseline_abs_error, direction_hit=s.direction_hit, window=s.n,
                rolling_mae=s.mae, rolling_baseline_mae=s.baseline_mae, mae_ratio=s.mae_ratio,
                direction_accuracy=s.direction_accuracy, behind=s.behind, target=s.target,
                lower=s.lower, upper=s.upper, covered=s.covered, band_width=s.band_width,
                baseline_lower=s.baseline_lower, baseline_upper=s.baseline_upper, baseline_covered=s.baseline_covered,
                baseline_band_width=s.baseline_band_width, interval_window=s.interval_n or None,
                rolling_coverage=s.coverage, rolling_band_width=s.mean_band_width,
                rolling_baseline_coverage=s.baseline_coverage, rolling_baseline_band_width=s.baseline_mean_band_width,
            ),
            s.model, f"h{s.horizon}",
        )
        self._owed[(s.symbol, s.interval)] += 1
        iv_ms = interval_ms(s.interval)
        for f in self.alerts.on_score(s.model, s.symbol, s.interval, s.target_open_time, iv_ms, s.horizon, s.n, s.mae_ratio):
            self._emit_alert(f)

    def scorer_horizon(self, model: str) -> int:
        m = self.router.get(model)
        return m.spec.horizons[0] if m is not None else 1

    def _emit_alert(self, f: Firing) -> None:
        self.m.alerts.labels(f.rule.name, f.status).inc()
        subject = f.labels.get("model") or f.labels.get("feature") or f.rule.kind
        self.out_alerts.put(
            AlertEvent(
                rule=f.rule.name, severity=f.severity, symbol=f.symbol, interval=f.interval, open_time=f.open_time,
                message=f.message, value=f.value, threshold=f.threshold, labels={**f.labels, "subject": subject},
                status=f.status,
            ),
            f.rule.name, subject,
        )
        self._owed[(f.symbol, f.interval)] += 1


def _restored_bands(bands: dict[str, dict[str, float]], iv: Any, name: str, base: float) -> tuple:
    """``(lower, upper, persistence lower, persistence upper)`` of column ``name`` for a forecast
    read back after a restart: its own 80 % band from the event's ``quantiles`` (the outer levels),
    persistence's from the package's quantiles around ``base`` (None without them, or when
    another version serves now)."""
    band = bands.get(name) or {}
    lo = band[min(band, key=float)] if band else None
    hi = band[max(band, key=float)] if band else None
    if iv is None or iv.baseline is None or name not in iv.columns:
        return lo, hi, None, None
    qb = iv.baseline[iv.columns.index(name)]
    return lo, hi, base * math.exp(min(qb)), base * math.exp(max(qb))


def _job_doc(job: Job) -> dict[str, Any]:
    return {"symbol": job.symbol, "interval": job.interval, "open_time": job.open_time, "model": job.model.spec.label}
