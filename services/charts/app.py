"""Charts service: klines.v1 + chart-requests.v1 -> rendered PNGs -> charts.v1.

It consumes klines.v1, not features.v1: a chart draws candles, and a
features.v1 event carries only the close and indicator values (no open, high,
low or volume). The indicators drawn come from ``compute_batch`` over the
kept window, the features service's own kernels, so they equal what
features.v1 publishes for the same candles.

charts.v1 goes through the once-per-candle guard: one chart per (symbol, interval, open_time,
preset), plus the window when a request asks for a non-default one. A cadence tick whose
newest candle was already charted (a 1h candle seen by six 10-minute ticks) renders nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures.process import BrokenProcessPool

from libs.common import topics
from libs.common.bus import redis_client
from libs.common.contracts import ChartEvent, ChartRequest, KlineEvent, now_ms
from libs.common.service import ServiceRuntime
from services.charts.settings import ChartsSettings
from services.charts.artifacts import ArtifactStore
from libs.common.stream_history import recent_candles
from services.charts.cadence import Cadence, ChartJob
from services.charts.events import chart_event
from services.charts.history import CandleHistory
from libs.charting.indicators import WARMUP
from libs.charting.pool import RenderPool
from libs.charting.presets import ChartPreset, get_preset
from libs.charting.window import ChartInputError, ChartWindow, check_window

SETTINGS = ChartsSettings
log = logging.getLogger("klinebus.charts")
MAX_REQUEST_WINDOW = 500  # the most candles a chart request may ask for; bounds memory per key
RATE_LOG_S = 60.0


def preset_for(job: ChartJob, settings: ChartsSettings) -> ChartPreset:
    base = get_preset(job.preset)
    if base.name == "analysis":
        return base.sized(job.window or settings.window, settings.width_px, settings.height_px)
    return base.sized(job.window)


def chart_identity(job: ChartJob, preset: ChartPreset) -> tuple[str, ...]:
    """What makes two charts of one candle different: the preset, and the window when a request
    asked for a non-default one (the cadence and a plain request share the chart)."""
    return (preset.name,) if job.window is None else (preset.name, f"w{job.window}")


def create(settings: ChartsSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime("charts", settings, url, description="Candlestick charts with indicator panels, on a cadence.")
    bus, metrics = runtime.bus, runtime.metrics
    bus.publisher(topics.CHARTS, ChartEvent)
    guard_client = redis_client(url)
    guard = bus.once_per_candle(topics.CHARTS, guard_client)
    charted: dict[tuple[str, ...], int] = {}  # chart identity -> newest open_time charted (as the guard said)
    history = CandleHistory(max(settings.window, MAX_REQUEST_WINDOW) + WARMUP)
    cadence = Cadence(settings.cadence_s, preset=settings.preset)
    store = ArtifactStore(settings.artifact_root())
    pool: dict[str, RenderPool] = {}
    wake = asyncio.Event()
    wanted = set(settings.symbols)
    skipped = metrics.counter("skipped_total", "Charts not rendered: superseded while pending, missed ticks, or too little data", ["why"])
    rendered = metrics.counter("rendered_total", "Charts rendered and published", ["preset", "reason"])
    render_seconds = metrics.histogram("render_seconds", "Render + store time of one chart", ["preset"])
    expired = metrics.counter("expired_total", "Chart artifacts deleted by retention")
    expire_errors = metrics.counter("expire_errors_total", "Retention sweeps that failed (retried next sweep)")
    pool_restarts = metrics.counter("pool_restarts_total", "Render pools replaced after a worker died")
    backfilled = metrics.counter("backfilled_total", "Candles read back from klines.v1 after a start", ["result"])
    # a stream's first candle after start asks for its history from klines.v1, filled off the hot path
    to_backfill: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
    backfill_asked: set[tuple[str, str]] = set()
    seen = {"replaced": 0, "missed": 0}
    minute = {"rendered": 0, "read_back": 0}  # INFO says these once a minute, not a line per chart

    def count_skips() -> None:
        for why, now in (("replaced", cadence.stats.replaced), ("missed", cadence.stats.missed_ticks)):
            if now > seen[why]:
                skipped.labels(why).inc(now - seen[why])
                seen[why] = now

    @bus.competing(topics.KLINES, description="Keep the recent candles of each symbol/interval.")
    async def on_kline(event: KlineEvent) -> None:
        metrics.events_in.labels(topics.KLINES).inc()
        if wanted and event.symbol not in wanted:
            return
        if not history.add(event.to_kline()):
            metrics.duplicates.labels(topics.KLINES).inc()
            return
        if (event.symbol, event.interval) not in backfill_asked:
            backfill_asked.add((event.symbol, event.interval))
            to_backfill.put_nowait((event.symbol, event.interval, event.open_time))
        track_if_full(event.symbol, event.interval)

    def track_if_full(symbol: str, interval: str) -> None:
        # the schedule starts once a full window is held, so a new symbol's first chart is complete
        if history.count(symbol, interval) >= settings.window:
            cadence.track(symbol, interval)
            wake.set()

    @bus.competing(topics.CHART_REQUESTS, description="Render a chart now, outside the cadence.")
    async def on_request(req: ChartRequest) -> None:
        metrics.events_in.labels(topics.CHART_REQUESTS).inc()
        job = ChartJob(req.symbol, req.interval, req.preset, req.window, "request", req.requested_by)
        try:
            preset_for(job, settings)
            if req.window is not None and req.window > MAX_REQUEST_WINDOW:
                raise ChartInputError(f"window {req.window} is above the service's maximum {MAX_REQUEST_WINDOW}")
        except ChartInputError as exc:
            await bus.dead_letter(topics.CHART_REQUESTS, req.model_dump(mode="json"), f"chart request: {exc}")
            return
        cadence.enqueue(job)
        count_skips()
        wake.set()

    async def render(job: ChartJob) -> None:
        preset = preset_for(job, settings)
        started = asyncio.get_running_loop().time()
        w = check_window(history.window(job.symbol, job.interval, preset), preset.window)
        more = chart_identity(job, preset)
        key = (w.symbol, w.interval, *more)
        if charted.get(key, -1) >= w.last_open_time:
            skipped.labels("already_charted").inc()  # nothing new since the last chart of this key
            log.debug("%s %s %s: candle %d already charted", w.symbol, w.interval, preset.name, w.last_open_time)
            return
        data = await render_png(job.preset, w, preset)
        rendered_at = now_ms()
        name = store.name_for(w.symbol, w.interval, preset.name, w.last_open_time, rendered_at)
        uri = await asyncio.to_thread(store.put, name, data)
        appended, last = await guard.publish(chart_event(w, preset, uri, rendered_at), *more)
        charted[key] = last
        if not appended:  # another replica (or this one before a restart) charted it first
            skipped.labels("already_charted").inc()
            await asyncio.to_thread(store.delete, name)
            return
        rendered.labels(preset.name, job.reason).inc()
        minute["rendered"] += 1
        render_seconds.labels(preset.name).observe(asyncio.get_running_loop().time() - started)

    async def render_png(name: str, w: ChartWindow, preset: ChartPreset) -> bytes:
        if name not in pool:
            pool[name] = RenderPool(settings.render_workers)
        p = pool[name]
        try:
            return await asyncio.wrap_future(p.submit(w, preset))
        except BrokenProcessPool:
            # a worker died (OOM kill, crash), which breaks its executor for good: replace it and
            # give this chart one more try on the fresh one (a chart that kills it again fails alone)
            pool_restarts.inc()
            log.warning("render pool %s broken (a worker died); starting a new one", name)
            await asyncio.to_thread(p.restart)
            return await asyncio.wrap_future(p.submit(w, preset))

    @runtime.background
    async def backfill_loop() -> None:
        need = settings.window + WARMUP  # what a scheduled chart draws, indicators warm
        client = redis_client(runtime.url)
        try:
            while True:
                symbol, interval, first = await to_backfill.get()
                try:
                    older = await recent_candles(client, symbol, interval, need, before=first,
                                                 partitions=settings.partitions)
                except Exception:  # noqa: BLE001 - without history the key still charts, just later
                    backfilled.labels("error").inc()
                    log.exception("reading back %s %s from %s failed", symbol, interval, topics.KLINES)
                    continue
                added = history.merge(older)
                backfilled.labels("ok").inc(added)
                minute["read_back"] += added
                log.debug("%s %s: %d earlier candles read back from %s", symbol, interval, added, topics.KLINES)
                track_if_full(symbol, interval)
        finally:
            await client.aclose()

    @runtime.background
    async def render_loop() -> None:
        loop_time = asyncio.get_running_loop().time
        last_said = loop_time()
        while True:
            if loop_time() - last_said >= RATE_LOG_S and any(minute.values()):
                log.info("charts: last %.0f s: %d charts rendered, %d candles read back from %s",
                         loop_time() - last_said, minute["rendered"], minute["read_back"], topics.KLINES)
                minute.update(rendered=0, read_back=0)
                last_said = loop_time()
            cadence.tick()
            count_skips()
            job = cadence.next_job()
            if job is None:
                wake.clear()
                timeout = cadence.seconds_to_next() if cadence.tracked else None
                try:
                    await asyncio.wait_for(wake.wait(), timeout=timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await render(job)
            except ChartInputError as exc:
                if job.reason == "request":
                    await bus.dead_letter(topics.CHART_REQUESTS, job.__dict__, f"chart request: {exc}")
                else:  # a young symbol: the schedule tries again next tick
                    skipped.labels("insufficient_data").inc()
                    log.debug("scheduled chart skipped: %s", exc)
            except Exception:  # noqa: BLE001 - one broken chart must not stop the schedule
                skipped.labels("error").inc()
                log.exception("chart of %s %s failed", job.symbol, job.interval)

    @runtime.background
    async def expire_loop() -> None:
        while True:
            try:
                n = await asyncio.to_thread(store.expire, settings.retention_s, now_ms())
            except Exception:  # noqa: BLE001 - a transient store error; the next sweep tries again
                n = 0
                expire_errors.inc()
                log.exception("retention sweep of %s failed", store.url)
            if n:
                expired.inc(n)
                log.info("expired %d chart artifacts older than %ss", n, int(settings.retention_s))
            await asyncio.sleep(settings.expire_every_s if math.isfinite(settings.expire_every_s) else 3600)

    @runtime.on_shutdown
    async def close_pools() -> None:
        for p in pool.values():
            await asyncio.to_thread(p.close)
        await guard_client.aclose()

    return runtime
