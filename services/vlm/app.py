"""VLM service: charts.v1 -> a vision-language model's structured reading -> analyses.v1.

The edge is thin: the charts.v1 handler records each chart in Redis (latest wins per
symbol/interval, see ``pending``) and returns; one worker per process takes waiting charts
one at a time to the model (in-process llama.cpp or a remote OpenAI-compatible server),
publishes each validated answer once per candle, and a scorer settles every published
analysis when its target candle closes, beside the baselines (see ``scoring``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any

import orjson

from libs.common import topics
from libs.common.bus import redis_client
from libs.common.contracts import AnalysisEvent, ChartEvent, InvalidEvent
from libs.common.klines import INTERVAL_MS
from libs.common.service import ServiceRuntime
from libs.common.settings import SettingsError
from libs.common.stream_history import recent_candles
from libs.llm.models import ModelFileError
from libs.llm.runtime import BackendUnavailable, CallTimeout, InputError, LLMError
from services.vlm.analysis import PriceFrame
from services.vlm.analyst import AnalysisRefused, Analyst, analysis_event
from services.vlm.backend import local_model, remote_model
from libs.common.artefacts import ArtefactRoot
from services.vlm.image import UnreadableImage, load_chart_png
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


class ChartUnusable(ValueError):
    pass


def create(settings: VlmSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime(NAME, settings, url, description="Vision-language model chart analyses (Qwen2.5-VL GGUF).")
    bus, metrics = runtime.bus, runtime.metrics
    bus.publisher(topics.ANALYSES, AnalysisEvent)
    skipped = metrics.counter("skipped_total", "Charts not analysed: superseded by a newer chart, older than the one waiting, or of another preset", ["why"])
    outcomes = metrics.counter("analyses_total", "Charts taken to the model, by outcome", ["result"])
    retries = metrics.counter("answer_retries_total", "Answers refused and asked again (with the reason)")
    backend_errors = metrics.counter("backend_errors_total", "Model calls that failed because the model or server was unavailable")
    phase_seconds = metrics.histogram(
        "call_seconds", "Seconds per chart by phase", ["phase"], buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
    )
    waiting = metrics.gauge("pending_charts", "Charts waiting for the model (latest per symbol/interval)")
    loaded = metrics.gauge("model_loaded", "1 when the model is loaded (local) or the server answered (remote)")
    gpu_layers = metrics.gauge("gpu_layers", "Model layers offloaded to a GPU (0: CPU only)")
    scored = metrics.counter("scored_total", "Scored calls per predictor (the VLM and its baselines)", ["symbol", "interval", "call", "predictor", "result"])
    hit_rate = metrics.gauge("hit_rate", "Rolling hit rate of calls per predictor (the VLM and its baselines)", ["symbol", "interval", "call", "predictor"])
    unscorable = metrics.counter("unscorable_total", "Analyses that could not be scored", ["why"])
    runtime.health.set("model", False)

    state: dict[str, Any] = {}
    wake = asyncio.Event()
    backend = remote_model(settings) if settings.backend == "remote" and settings.remote_url else None
    # the chart's deadline (its retry shares it) plus reading candles and image, and publishing
    lease_ms = int(settings.call_timeout_s * 1000 + LEASE_MARGIN_MS)
    backend_failures: dict[tuple[str, int], int] = {}

    @bus.competing(topics.CHARTS, description="Charts to analyse; the latest per symbol/interval wins when behind.")
    async def on_chart(event: ChartEvent) -> None:
        metrics.events_in.labels(topics.CHARTS).inc()
        if event.preset not in settings.presets:
            skipped.labels("preset").inc()
            return
        recorded, other = await state["pending"].offer(event.symbol, event.interval, event.open_time, event.to_json())
        if not recorded:
            skipped.labels("stale").inc()
        elif other is not None:
            skipped.labels("superseded").inc()
        wake.set()

    @runtime.on_startup
    async def connect() -> None:
        problem = settings.backend_problem()
        if problem:
            raise SettingsError(problem)
        client = redis_client(runtime.url)
        state["client"] = client
        state["pending"] = PendingCharts(client, NAME)
        state["once"] = bus.once_per_candle(topics.ANALYSES, client)
        state["to_score"] = topics.stream_companion_key(topics.ANALYSES, f"{NAME}:to-score")
        taken_back = await state["pending"].release_owned(bus.consumer)
        if taken_back:
            log.info("vlm: %d chart(s) this replica held when it stopped are waiting again", taken_back)
        waiting.set_function(lambda: state.get("waiting", 0))

    @runtime.on_shutdown
    async def disconnect() -> None:
        b = state.get("backend") or backend
        if b is not None:
            await b.close()
        if "client" in state:
            await state["client"].aclose()

    async def ready_backend() -> Any:
        """Load the model (or reach the server) until it works; one log line per failed try."""
        while True:
            try:
                if settings.backend == "remote":
                    await backend.describe()
                    b = backend
                else:
                    b = await asyncio.to_thread(local_model, settings)
                    await asyncio.to_thread(b.load)
                    gpu_layers.set(b.gpu_layers)
            except (ModelFileError, BackendUnavailable) as exc:
                backend_errors.inc()
                runtime.health.set("model", False)
                log.error("vlm model not available (retry in %ss): %s", settings.model_retry_s, exc)
                await asyncio.sleep(settings.model_retry_s)
                continue
            loaded.set(1)
            runtime.health.set("model", True)
            log.info("vlm backend %s ready: %s @ %s", b.kind, b.model_name, b.revision)
            return b

    async def frame_of(chart: ChartEvent) -> PriceFrame:
        candles = await recent_candles(state["client"], chart.symbol, chart.interval, chart.window, before=chart.open_time + 1)
        candles = [k for k in candles if k.open_time >= chart.first_open_time]
        if not candles or candles[-1].open_time != chart.open_time:
            raise ChartUnusable(f"the candles of the chart ({chart.symbol} {chart.interval} up to {chart.open_time}) are not on {topics.KLINES}")
        return PriceFrame.of(candles)

    artefacts = ArtefactRoot(settings.artifact_root(), settings.max_chart_bytes, metrics)  # the only place charts are read

    async def refuse(chart_raw: bytes, why: str, reason: str) -> None:
        outcomes.labels(why).inc()
        await bus.dead_letter(topics.CHARTS, chart_raw, f"vlm {why}: {reason}")

    async def handle(analyst: Analyst, b: Any, field: str, open_time: int, raw: bytes) -> None:
        pending = state["pending"]
        try:
            chart = ChartEvent.from_json(raw)
        except InvalidEvent as exc:
            await refuse(raw, "invalid", exc.reason)
            await pending.done(field, open_time)
            return
        try:
            frame = await frame_of(chart)
            started = time.perf_counter()
            png, _, _ = await asyncio.to_thread(load_chart_png, chart.uri, settings.image_max_side, artefacts)
            prep_ms = (time.perf_counter() - started) * 1000.0
            result = await analyst.analyse(chart, frame, png)
        except BackendUnavailable as exc:
            backend_errors.inc()
            runtime.health.set("model", False)
            loaded.set(0)
            key = (field, open_time)
            tries = backend_failures.pop(key, 0) + 1
            if tries >= settings.backend_attempts:
                await refuse(raw, "backend_down", str(exc))
                await pending.done(field, open_time)
            else:
                backend_failures[key] = tries
                log.warning("vlm backend unavailable, %s %s waits: %s", chart.symbol, chart.interval, exc)
                await pending.release(field, open_time)
                await asyncio.sleep(min(settings.model_retry_s, 5.0))
            return
        except (ChartUnusable, UnreadableImage) as exc:
            await refuse(raw, "unusable_chart", str(exc))
        except CallTimeout as exc:
            await refuse(raw, "timeout", str(exc))
        except AnalysisRefused as exc:
            retries.inc()
            await refuse(raw, "refused", exc.reason)
        except InputError as exc:
            await refuse(raw, "input", str(exc))
        except LLMError as exc:
            await refuse(raw, "model_error", str(exc))
        else:
            runtime.health.set("model", True)
            loaded.set(1)
            retries.inc(result.attempts - 1)
            event = analysis_event(
                chart, frame, result, model=b.model_name, revision=b.revision, backend=b.kind, image_prep_ms=prep_ms
            )
            for phase, ms in event.timings_ms.items():
                phase_seconds.labels(phase).observe(ms / 1000.0)
            await publish(event, frame)
        backend_failures.pop((field, open_time), None)
        await pending.done(field, open_time)

    async def publish(event: AnalysisEvent, frame: PriceFrame) -> None:
        client = state["client"]
        score_field = f"{event.symbol}|{event.interval}|{event.open_time}"
        target = event.open_time + settings.score_horizon * INTERVAL_MS[event.interval]
        record = Pending(event.symbol, event.interval, event.open_time, target, frame.last_close, frame.prev_close, event.signal or "hold", event.trend)
        # recorded before the publish: a crash in between leaves a record the re-run publish keeps
        await client.hset(state["to_score"], score_field, orjson.dumps(asdict(record)))
        appended, last = await state["once"].publish(event)
        if appended:
            outcomes.labels("published").inc()
        else:
            outcomes.labels("duplicate").inc()
            if last > event.open_time:  # a newer analysis exists: this one was never published
                await client.hdel(state["to_score"], score_field)

    @runtime.background
    async def analyse_loop() -> None:
        b = await ready_backend()
        state["backend"] = b
        analyst = Analyst(b, timeout_s=settings.call_timeout_s, temperature=settings.temperature, seed=settings.seed, summary_max_chars=settings.summary_max_chars)
        pending = state["pending"]
        while True:
            wake.clear()
            todo = await pending.waiting()
            state["waiting"] = len(todo)
            took = False
            for field, open_time in todo:
                raw = await pending.take(field, open_time, bus.consumer, lease_ms)
                if raw is None:
                    continue
                took = True
                try:
                    await handle(analyst, b, field, open_time, raw)
                except Exception as exc:  # noqa: BLE001 - one chart that trips a bug must not stop the worker
                    log.exception("vlm: analysing %s failed unexpectedly", field)
                    await refuse(raw, "error", f"{type(exc).__name__}: {exc}")
                    await pending.done(field, open_time)
                break  # look again: newer charts may have replaced the others meanwhile
            if not took:
                try:
                    await asyncio.wait_for(wake.wait(), IDLE_POLL_S)
                except asyncio.TimeoutError:
                    pass

    @runtime.background
    async def score_loop() -> None:
        while "pending" not in state:
            await asyncio.sleep(0.1)
        client, key = state["client"], state["to_score"]
        while True:
            state["waiting"] = await state["pending"].count()
            for f, raw in (await client.hgetall(key)).items():
                try:
                    p = Pending(**orjson.loads(raw))
                except (orjson.JSONDecodeError, TypeError):
                    await client.hdel(key, f)
                    unscorable.labels("bad_record").inc()
                    continue
                if time.time() * 1000 < p.target_open_time + INTERVAL_MS[p.interval]:
                    continue  # the target candle has not closed yet
                candles = await recent_candles(client, p.symbol, p.interval, 1, before=p.target_open_time + 1)
                if candles and candles[-1].open_time == p.target_open_time:
                    if await client.hdel(key, f):  # only the replica that removes it scores it
                        await record_score(p, candles[-1].close)
                elif time.time() * 1000 > p.target_open_time + SCORE_GIVE_UP_HORIZONS * settings.score_horizon * INTERVAL_MS[p.interval]:
                    if await client.hdel(key, f):
                        unscorable.labels("target_candle_missing").inc()
            await asyncio.sleep(settings.score_poll_s)

    async def record_score(p: Pending, exit_close: float) -> None:
        # the market's recent scores live in Redis: the rolling rates and the majority baseline
        # survive restarts and are shared by replicas
        client = state["client"]
        key = topics.stream_companion_key(topics.ANALYSES, f"{NAME}:scores:{p.symbol}|{p.interval}")
        history = [orjson.loads(r) for r in await client.lrange(key, -settings.score_window, -1)]
        record = score(p, exit_close, history, settings.score_flat_bps)
        await client.rpush(key, orjson.dumps(record))
        await client.ltrim(key, -settings.score_window, -1)
        for name, hit in record["hits"].items():
            call, predictor = name.split("|")
            scored.labels(p.symbol, p.interval, call, predictor, "hit" if hit else "miss").inc()
        for (call, predictor), rate in hit_rates((history + [record])[-settings.score_window :]).items():
            hit_rate.labels(p.symbol, p.interval, call, predictor).set(rate)

    return runtime
