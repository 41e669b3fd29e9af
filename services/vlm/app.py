"""VLM service: charts.v1 -> a vision-language model's structured reading -> analyses.v1.

Three layers, each knowing only the one below:

* ``desk.Desk``, the waiting room's logic (latest chart wins per symbol/interval; one chart at a
  time to the model; what each outcome means): no Redis, unit-tested with dicts. It reaches the
  outside through a ``WaitingRoom`` (``pending.PendingCharts``: records and leases in Redis, so a
  kill loses nothing) and a ``DeskPort`` (``RedisDesk`` here: candles, image, dead letters,
  publish).
* ``VlmService``, the component: ``start`` (connect, give back this consumer's leases),
  ``on_chart`` (record a chart and return: the stream is acknowledged at once, so a slow model
  never holds it back), ``analyse_loop`` (load the model, then the desk's steps), ``score_loop``
  (settle every published analysis when its target candle closes, beside the baselines, see
  ``scoring``), ``stop``. Charts are a competing group: there is no ownership to gain or lose;
  replicas share the waiting room through its leases.
* ``create``: the faststream-shaped edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any

import orjson

from libs.common import topics
from libs.common.artefacts import ArtefactRoot
from libs.common.bus import redis_client
from libs.common.contracts import AnalysisEvent, ChartEvent
from libs.common.klines import INTERVAL_MS
from libs.common.service import ServiceRuntime
from libs.common.settings import SettingsError
from libs.common.stream_history import recent_candles
from libs.llm.models import ModelFileError
from libs.llm.runtime import BackendUnavailable
from services.vlm.analysis import PriceFrame
from services.vlm.analyst import Analyst
from services.vlm.backend import local_model, remote_model
from services.vlm.desk import ChartUnusable, Desk, DeskMetrics
from services.vlm.image import load_chart_png
from services.vlm.pending import PendingCharts
from services.vlm.scoring import Pending, hit_rates, score
from services.vlm.settings import VlmSettings

SETTINGS = VlmSettings
NAME = "vlm"
log = logging.getLogger("klinebus.vlm")
# A waiting chart is looked for at least this often even without a new chart's wake-up
# (another replica's lease may have expired).
IDLE_POLL_S = 1.0
# A pending score whose target candle is this many horizons overdue is given up (the candle
# is not on klines.v1: a gap or a trimmed stream).
SCORE_GIVE_UP_HORIZONS = 20
LEASE_MARGIN_MS = 30_000

__all__ = ["ChartUnusable", "RedisDesk", "VlmService", "create"]


class RedisDesk:
    """``desk.DeskPort`` over Redis: candles from klines.v1, the chart image under the artefact
    root, dead letters, analyses published once per candle with a score record written first."""

    def __init__(self, service: "VlmService") -> None:
        self.s = service

    async def frame_of(self, chart: ChartEvent) -> PriceFrame:
        candles = await recent_candles(self.s.client, chart.symbol, chart.interval, chart.window, before=chart.open_time + 1,
                                       partitions=self.s.settings.partitions)
        candles = [k for k in candles if k.open_time >= chart.first_open_time]
        if not candles or candles[-1].open_time != chart.open_time:
            raise ChartUnusable(f"the candles of the chart ({chart.symbol} {chart.interval} up to {chart.open_time}) are not on {topics.KLINES}")
        return PriceFrame.of(candles)

    async def image_of(self, chart: ChartEvent) -> bytes:
        png, _, _ = await asyncio.to_thread(load_chart_png, chart.uri, self.s.settings.image_max_side, self.s.artefacts)
        return png

    async def dead_letter(self, raw: bytes, reason: str) -> None:
        await self.s.bus.dead_letter(topics.CHARTS, raw, reason)

    async def publish(self, event: AnalysisEvent, frame: PriceFrame) -> bool:
        s = self.s
        score_field = f"{event.symbol}|{event.interval}|{event.open_time}"
        target = event.open_time + s.settings.score_horizon * INTERVAL_MS[event.interval]
        record = Pending(event.symbol, event.interval, event.open_time, target, frame.last_close, frame.prev_close,
                         event.signal or "hold", event.trend)
        # recorded before the publish: a crash in between leaves a record the re-run publish keeps
        await s.client.hset(s.to_score, score_field, orjson.dumps(asdict(record)))
        appended, last = await s.once.publish(event)
        if not appended and last > event.open_time:  # a newer analysis exists: this one was never published
            await s.client.hdel(s.to_score, score_field)
        return appended


class VlmService:
    """The vlm component; see the module docstring for its lifecycle."""

    def __init__(self, runtime: ServiceRuntime, settings: VlmSettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.bus = runtime.bus
        metrics = runtime.metrics
        self.m = DeskMetrics(
            skipped=metrics.counter("skipped_total", "Charts not analysed: superseded by a newer chart, older than the one waiting, or of another preset", ["why"]),
            outcomes=metrics.counter("analyses_total", "Charts taken to the model, by outcome", ["result"]),
            retries=metrics.counter("answer_retries_total", "Answers refused and asked again (with the reason)"),
            backend_errors=metrics.counter("backend_errors_total", "Model calls that failed because the model or server was unavailable"),
            phase_seconds=metrics.histogram(
                "call_seconds", "Seconds per chart by phase", ["phase"], buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
            ),
        )
        self.waiting_gauge = metrics.gauge("pending_charts", "Charts waiting for the model (latest per symbol/interval)")
        self.loaded = metrics.gauge("model_loaded", "1 when the model is loaded (local) or the server answered (remote)")
        self.gpu_layers = metrics.gauge("gpu_layers", "Model layers offloaded to a GPU (0: CPU only)")
        self.scored = metrics.counter("scored_total", "Scored calls per predictor (the VLM and its baselines)", ["symbol", "interval", "call", "predictor", "result"])
        self.hit_rate = metrics.gauge("hit_rate", "Rolling hit rate of calls per predictor (the VLM and its baselines)", ["symbol", "interval", "call", "predictor"])
        self.unscorable = metrics.counter("unscorable_total", "Analyses that could not be scored", ["why"])
        runtime.health.set("model", False)
        self.backend = remote_model(settings) if settings.backend == "remote" and settings.remote_url else None
        self.artefacts = ArtefactRoot(settings.artifact_root(), settings.max_chart_bytes, metrics)  # the only place charts are read
        # the chart's deadline (its retry shares it) plus reading candles and image, and publishing
        self.lease_ms = int(settings.call_timeout_s * 1000 + LEASE_MARGIN_MS)
        self.client: Any = None
        self.desk: Desk | None = None
        self.once: Any = None
        self.to_score = topics.stream_companion_key(topics.ANALYSES, f"{NAME}:to-score")
        self._started = asyncio.Event()

    def _backend_ok(self, ok: bool) -> None:
        self.runtime.health.set("model", ok)
        self.loaded.set(1 if ok else 0)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        problem = self.settings.backend_problem()
        if problem:
            raise SettingsError(problem)
        self.client = redis_client(self.runtime.url)
        self.once = self.bus.once_per_candle(topics.ANALYSES, self.client)
        s = self.settings
        self.desk = Desk(
            PendingCharts(self.client, NAME), RedisDesk(self), self.m, consumer=self.bus.consumer,
            lease_ms=self.lease_ms, presets=s.presets, backend_attempts=s.backend_attempts,
            backend_retry_s=s.model_retry_s, on_backend=self._backend_ok,
        )
        await self.desk.start()
        self.waiting_gauge.set_function(lambda: self.desk.waiting if self.desk is not None else 0)
        self._started.set()

    async def on_chart(self, event: ChartEvent) -> None:
        assert self.desk is not None, "on_chart before start"
        await self.desk.offer(event)

    async def analyse_loop(self) -> None:
        b = await self._ready_backend()
        self.backend = b
        s = self.settings
        analyst = Analyst(b, timeout_s=s.call_timeout_s, temperature=s.temperature, seed=s.seed,
                          summary_max_chars=s.summary_max_chars)
        desk = self.desk
        assert desk is not None
        while True:
            if not await desk.step(analyst, b):
                try:
                    await asyncio.wait_for(desk.wake.wait(), IDLE_POLL_S)
                except asyncio.TimeoutError:
                    pass

    async def score_loop(self) -> None:
        await self._started.wait()
        client, key, s = self.client, self.to_score, self.settings
        while True:
            self.desk.waiting = await self.desk.room.count()  # type: ignore[union-attr]
            for f, raw in (await client.hgetall(key)).items():
                try:
                    p = Pending(**orjson.loads(raw))
                except (orjson.JSONDecodeError, TypeError):
                    await client.hdel(key, f)
                    self.unscorable.labels("bad_record").inc()
                    continue
                if time.time() * 1000 < p.target_open_time + INTERVAL_MS[p.interval]:
                    continue  # the target candle has not closed yet
                candles = await recent_candles(client, p.symbol, p.interval, 1, before=p.target_open_time + 1,
                                               partitions=s.partitions)
                if candles and candles[-1].open_time == p.target_open_time:
                    if await client.hdel(key, f):  # only the replica that removes it scores it
                        await self._record_score(p, candles[-1].close)
                elif time.time() * 1000 > p.target_open_time + SCORE_GIVE_UP_HORIZONS * s.score_horizon * INTERVAL_MS[p.interval]:
                    if await client.hdel(key, f):
                        self.unscorable.labels("target_candle_missing").inc()
            await asyncio.sleep(s.score_poll_s)

    async def stop(self) -> None:
        if self.backend is not None:
            await self.backend.close()
        if self.client is not None:
            await self.client.aclose()

    # --- parts ------------------------------------------------------------------------------------

    async def _ready_backend(self) -> Any:
        """Load the model (or reach the server) until it works; one log line per failed try."""
        s = self.settings
        while True:
            try:
                if s.backend == "remote":
                    await self.backend.describe()
                    b = self.backend
                else:
                    b = await asyncio.to_thread(local_model, s)
                    await asyncio.to_thread(b.load)
                    self.gpu_layers.set(b.gpu_layers)
            except (ModelFileError, BackendUnavailable) as exc:
                self.m.backend_errors.inc()
                self.runtime.health.set("model", False)
                log.error("vlm model not available (retry in %ss): %s", s.model_retry_s, exc)
                await asyncio.sleep(s.model_retry_s)
                continue
            self._backend_ok(True)
            log.info("vlm backend %s ready: %s @ %s", b.kind, b.model_name, b.revision)
            return b

    async def _record_score(self, p: Pending, exit_close: float) -> None:
        # the market's recent scores live in Redis: the rolling rates and the majority baseline
        # survive restarts and are shared by replicas
        client, s = self.client, self.settings
        key = topics.stream_companion_key(topics.ANALYSES, f"{NAME}:scores:{p.symbol}|{p.interval}")
        history = [orjson.loads(r) for r in await client.lrange(key, -s.score_window, -1)]
        record = score(p, exit_close, history, s.score_flat_bps)
        await client.rpush(key, orjson.dumps(record))
        await client.ltrim(key, -s.score_window, -1)
        for name, hit in record["hits"].items():
            call, predictor = name.split("|")
            self.scored.labels(p.symbol, p.interval, call, predictor, "hit" if hit else "miss").inc()
        for (call, predictor), rate in hit_rates((history + [record])[-s.score_window :]).items():
            self.hit_rate.labels(p.symbol, p.interval, call, predictor).set(rate)


def create(settings: VlmSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime(NAME, settings, url, description="Vision-language model chart analyses (Qwen2.5-VL GGUF).")
    bus = runtime.bus
    bus.publisher(topics.ANALYSES, AnalysisEvent)
    service = VlmService(runtime, settings)

    @bus.competing(topics.CHARTS, description="Charts to analyse; the latest per symbol/interval wins when behind.")
    async def on_chart(event: ChartEvent) -> None:
        runtime.metrics.events_in.labels(topics.CHARTS).inc()
        await service.on_chart(event)

    @runtime.on_startup
    async def connect() -> None:
        await service.start()

    @runtime.on_shutdown
    async def disconnect() -> None:
        await service.stop()

    @runtime.background
    async def analyse_loop() -> None:
        await service.analyse_loop()

    @runtime.background
    async def score_loop() -> None:
        await service.score_loop()

    return runtime
