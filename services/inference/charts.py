"""Serving chart classifiers on ``charts.v1``: which packages serve, and what a chart event becomes.

For every chart of a classifier's preset (``config.chart.preset``) and pair, the PNG is read
from the artefact root only (``libs.common.artefacts``: the event's uri must lie under it; size
cap, PNG signature), the chart's last candle is read back from ``klines.v1``
(``libs.common.stream_history``: charts.v1 carries no OHLCV, and the candle is the newest of its
stream there, so the read is short), the package writes its text and tokenises it, and one
``predictions.v1`` event per (chart, model) carries the class probabilities, the class and the
next close. A chart that cannot be fed (unreadable, corrupt, another size, another window, its
candle not on klines.v1) is one log line, a dead letter and
``klinebus_inference_chart_errors_total{model,reason}``; the next chart is served as usual.
``on_chart`` answers one chart (one session call per model); ``on_charts`` a delivery of charts
(``bus.ordered_batch``) with one session call per model for all of them (``ChartBatcher``).
A package that cannot serve (missing tokenizer, wrong inputs) is refused like any other package.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Iterable

from libs.common import topics
from libs.common.artefacts import ArtefactRefused, ArtefactRoot
from libs.common.contracts import ChartEvent, ModelPublished, PredictionEvent
from libs.common.klines import interval_ms, now_ms
from libs.common.model_package import PackageError
from libs.common.stream_history import recent_candles
from services.inference.batching import ChartBatcher, Job
from services.inference.chart_models import (
    ChartForecast,
    ChartImageError,
    ChartModel,
    ChartSpec,
    NotAChartClassifier,
    load_chart_package,
    registry_chart_packages,
)

log = logging.getLogger("klinebus.inference")

# Reasons a chart got no forecast (metric label values, bounded).
UNREADABLE = "unreadable"
REFUSED_URI = "refused_uri"  # outside the artefact root, not a PNG, too large (libs/common/artefacts.py)
BAD_IMAGE = "bad_image"
WRONG_WINDOW = "wrong_window"
NO_CANDLE = "no_candle"
MODEL_FAILED = "model_failed"


def load_chart_model(spec: ChartSpec, threads: int) -> ChartModel:
    model = ChartModel(spec, threads)
    model.warm()
    return model


class ChartServing:
    def __init__(self, engine: Any, client: Any, publish: Callable[..., Awaitable[Any]],
                 dead_letter: Callable[[str, Any, str], Awaitable[None]], metrics: Any, threads: int = 1,
                 artefacts: ArtefactRoot | None = None, max_batch: int = 32, partitions: int = 1) -> None:
        self.engine, self.client, self.publish, self.dead_letter = engine, client, publish, dead_letter
        self.partitions = partitions  # klines.v1's: a chart's candle is on its pair's partition stream
        if artefacts is None:
            raise ValueError("ChartServing needs the artefact root charts are read from")
        self.artefacts = artefacts
        self.threads = threads
        self.max_batch = max_batch  # charts per session call in on_charts
        self.models: dict[str, ChartModel] = {}
        self.batchers: dict[str, ChartBatcher] = {}
        self.errors = metrics.counter("chart_errors_total", "Charts a chart classifier could not answer, by reason",
                                      ["model", "reason"])

    # --- packages -----------------------------------------------------------------------------

    async def registry(self, model_dir, promoted_only: bool) -> dict[str, ChartSpec]:
        return {s.name: s for s in await asyncio.to_thread(registry_chart_packages, model_dir, promoted_only)}

    async def fetch(self, ev: ModelPublished, cache_dir) -> ChartSpec | None:
        """The chart classifier an announcement names, or None (another kind, or refused: logged, counted)."""
        try:
            spec = await asyncio.to_thread(load_chart_package, ev.uri, ev.sha256, cache_dir)
        except NotAChartClassifier:
            return None
        except PackageError as exc:
            self.engine.m.load_failures.labels(ev.model).inc()
            log.error("cannot serve %s@%s announced on models.v1: %s", ev.model, ev.version, exc)
            return None
        return spec

    async def _install(self, spec: ChartSpec) -> None:
        model = await asyncio.to_thread(load_chart_model, spec, self.threads)
        old = self.models.get(spec.name)
        self.models[spec.name] = model
        m = self.engine.m
        if old is not None:
            m.model_info.remove(old.spec.name, old.spec.version, "chart-classifier")
        m.model_info.labels(spec.name, spec.version, "chart-classifier").set(1)
        m.loads.labels(spec.name).inc()
        pairs = "all pairs" if spec.pairs is None else ", ".join(sorted(f"{s} {i}" for s, i in spec.pairs))
        log.info("serving %s on charts.v1 (preset %s, %s)%s", spec.label, spec.preset or "any", pairs,
                 f" (was {old.spec.version})" if old is not None else "")

    async def sync(self, specs: Iterable[ChartSpec]) -> None:
        for spec in specs:
            serving = self.models.get(spec.name)
            if serving is not None and (serving.spec.version, serving.spec.sha256) == (spec.version, spec.sha256):
                continue
            try:
                await self._install(spec)
            except PackageError as exc:
                self.engine.m.load_failures.labels(spec.name).inc()
                log.error("cannot serve %s: %s", spec.label, exc)

    async def on_model(self, event: ModelPublished, cache_dir) -> bool:
        """An announcement that is not a features.v1 model: True when it was a chart classifier
        (swapped in, or refused with a dead letter while the old version keeps serving)."""
        current = self.models.get(event.model)
        try:
            spec = await asyncio.to_thread(load_chart_package, event.uri, event.sha256, cache_dir)
            if spec.name != event.model or spec.version != event.version:
                raise PackageError(f"the package at {event.uri} is {spec.label}, not {event.model}@{event.version}")
            if current is not None and (current.spec.version, current.spec.sha256) == (spec.version, spec.sha256):
                return True
            await self._install(spec)
        except NotAChartClassifier:
            return False
        except PackageError as exc:
            self.engine.m.load_failures.labels(event.model).inc()
            kept = f"; still serving {current.spec.label}" if current is not None else ""
            reason = f"model {event.model}@{event.version} refused: {exc}{kept}"
            log.error("%s", reason)
            await self.dead_letter(topics.MODELS, event.to_json(), reason)
        return True

    # --- charts -------------------------------------------------------------------------------

    async def _refuse(self, event: ChartEvent, models: list[ChartModel], reason: str, why: str) -> None:
        for m in models:
            self.errors.labels(m.spec.name, reason).inc()
        names = ", ".join(m.spec.label for m in models)
        line = f"chart {event.symbol} {event.interval} {event.open_time} ({event.uri}) not answered by {names}: {why}"
        log.error("%s", line)
        await self.dead_letter(topics.CHARTS, event.to_json(), line)

    async def _prepare(self, event: ChartEvent, refuse: Any = None) -> tuple[list[ChartModel], bytes, Any] | None:
        """The models that answer this chart, its PNG and its last candle; None when no model
        answers it (none serves it, or it was refused through ``refuse``, ``_refuse`` by default:
        logged, counted, dead-lettered)."""
        refuse = refuse or self._refuse
        models = [m for m in self.models.values()
                  if m.spec.serves(event.symbol, event.interval) and (not m.spec.preset or m.spec.preset == event.preset)]
        if not models:
            return None
        wrong = [m for m in models if m.spec.meta is not None and event.window != m.spec.meta.lookback]
        if wrong:
            await refuse(event, wrong, WRONG_WINDOW,
                               f"it shows {event.window} candles, the model reads {wrong[0].spec.meta.lookback}")
            models = [m for m in models if m not in wrong]
            if not models:
                return None
        try:
            png = await asyncio.to_thread(self.artefacts.read_png, event.uri)
        except ArtefactRefused as exc:  # missing or expired: unreadable; anything else: refused before use
            why = UNREADABLE if exc.kind == "unreadable" else REFUSED_URI
            await refuse(event, models, why, f"cannot read it ({exc.kind}: {exc.reason})")
            return None
        candles = await recent_candles(self.client, event.symbol, event.interval, 1, event.open_time + 1,
                                       partitions=self.partitions)
        if not candles or candles[-1].open_time != event.open_time:
            await refuse(event, models, NO_CANDLE, f"its last candle ({event.open_time}) is not on klines.v1")
            return None
        return models, png, candles[-1]

    async def on_chart(self, event: ChartEvent) -> None:
        prepared = await self._prepare(event)
        if prepared is None:
            return
        models, png, k = prepared
        candle = (k.open, k.high, k.low, k.close, k.volume)
        for m in models:
            try:
                fc = await asyncio.to_thread(m.predict, png, candle, event.uri)
            except Exception as exc:  # noqa: BLE001 - handled by _answered (bad image, failing session)
                fc = exc
            await self._answered(event, m, k, fc)

    async def on_charts(self, events: list[ChartEvent]) -> None:
        """A delivery of charts in stream order (``bus.ordered_batch``): the same forecasts, refusals
        and publishing order as ``on_chart`` for each, with one session call per model for all of
        them (each model's ``ChartBatcher``: its own thread, at most ``max_batch`` charts a call).
        Idempotent per chart, as the bus asks: forecasts go through the once-per-candle publisher."""
        # A chart refused while preparing is dead-lettered at its place in the delivery, after the
        # answers and refusals of the charts before it, as ``on_chart`` one by one would: refusals
        # are held until the answers are in.
        held: dict[int, list[tuple]] = {}
        prepared_all: list[tuple | None] = []
        for i, event in enumerate(events):
            async def hold(*args: Any, i: int = i) -> None:
                held.setdefault(i, []).append(args)

            prepared_all.append(await self._prepare(event, hold))
        ready = [(event, *prepared) for event, prepared in zip(events, prepared_all) if prepared is not None]
        jobs: dict[str, list[Job]] = {}
        for n, (event, models, png, k) in enumerate(ready):
            for m in models:
                jobs.setdefault(m.spec.name, []).append(Job(
                    model=m, symbol=event.symbol, interval=event.interval, open_time=event.open_time, window=png,
                    last_close=k.close, meta={"candle": (k.open, k.high, k.low, k.close, k.volume), "where": event.uri,
                                              "n": n}))
        names = list(jobs)
        results = await asyncio.gather(*(self._batcher(name).answer(jobs[name]) for name in names))
        answers = {(job.meta["n"], name): r for name in names for job, r in zip(jobs[name], results[names.index(name)])}
        n = 0
        for i, (event, prepared) in enumerate(zip(events, prepared_all)):
            for args in held.get(i, ()):
                await self._refuse(*args)
            if prepared is None:
                continue
            models, _, k = prepared
            for m in models:
                await self._answered(event, m, k, answers[(n, m.spec.name)])
            n += 1

    def _batcher(self, name: str) -> ChartBatcher:
        if name not in self.batchers:
            self.batchers[name] = ChartBatcher(f"chart:{name}", max_batch=self.max_batch)
        return self.batchers[name]

    async def stop(self) -> None:
        """Stop the chart batchers (their threads); a caller still waiting is cancelled."""
        for b in list(self.batchers.values()):
            await b.stop()
        self.batchers.clear()

    async def _answered(self, event: ChartEvent, m: ChartModel, k: Any, fc: ChartForecast | BaseException) -> None:
        spec = m.spec
        if isinstance(fc, ChartImageError):
            await self._refuse(event, [m], BAD_IMAGE, str(fc))
            return
        if isinstance(fc, BaseException):  # a failing session: that chart is dead-lettered, serving goes on
            self.engine.m.model_errors.labels(spec.name).inc()
            await self._refuse(event, [m], MODEL_FAILED, f"{type(fc).__name__}: {_line(fc)}")
            return
        iv = interval_ms(event.interval)
        now = now_ms()
        pred = PredictionEvent(
            symbol=event.symbol, interval=event.interval, open_time=event.open_time, model=spec.name,
            model_version=spec.version, target_open_time=event.open_time + iv, horizon=1,
            # "class": the index of the most likely class, in the order of ``probabilities``.
            predicted={"close": fc.next_close, "class": float(spec.classes.index(fc.predicted_class))}, last_close=k.close, probabilities=fc.probabilities,
            close_to_publish_ms=max(0, now - event.open_time - iv), role="primary" if spec.promoted else "shadow",
        )
        await self.publish([pred], spec.name)
        self.engine.m.predictions.labels(spec.name).inc()
        self.engine.m.last_prediction.labels(spec.name).set(now / 1000.0)
        # Scored like every forecast when its target candle closes on features.v1.
        for s in self.engine.scorer.add_forecast(spec.name, spec.version, event.symbol, event.interval,
                                                 event.open_time, k.close, [(1, event.open_time + iv, fc.next_close)]):
            self.engine._emit_score(s)


def _line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__
