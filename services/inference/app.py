"""Inference service: features.v1 -> every promoted ONNX model + persistence -> predictions.v1,
scores.v1, alerts.v1; models.v1 hot-reloads models. The edge only: decode, hand to
``server.Inference``, publish what it returns."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from libs.common import topics
from libs.common.bus import redis_client
from libs.common.contracts import AlertEvent, ChartEvent, FeaturesEvent, ModelPublished, PredictionEvent, ScoreEvent
from libs.common.service import ServiceRuntime
from libs.common.settings import SettingsError
from services.inference import history
from services.inference.alert_rules import RulesError, load_rules
from services.inference.backfill import Backfill
from services.inference.charts import ChartServing
from services.inference.baseline import ensure_persistence_model, persistence_spec
from services.inference.package import NotServable, PackageError, load_package, registry_packages
from services.inference.server import Config, Inference, ServedModel, load_model
from services.inference.settings import InferenceSettings

SETTINGS = InferenceSettings
log = logging.getLogger("klinebus.inference")


def create(settings: InferenceSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime(
        "inference", settings, url,
        description="Serves every promoted ONNX model beside persistence on closed-candle features; scores "
        "each forecast when its candle closes; market alert rules.",
    )
    bus, metrics = runtime.bus, runtime.metrics
    bus.publisher(topics.PREDICTIONS, PredictionEvent)
    bus.publisher(topics.SCORES, ScoreEvent)
    bus.publisher(topics.ALERTS, AlertEvent)
    try:
        rules = load_rules(settings.alert_rules) if settings.alert_rules else []
    except RulesError as exc:
        for problem in exc.problems:
            log.error("alert rules %s: %s", settings.alert_rules, problem)
        raise SettingsError(f"invalid setting KLINEBUS_ALERT_RULES: {exc}") from None
    client = redis_client(url)
    predictions = bus.once_per_candle(topics.PREDICTIONS, client)
    scores = bus.once_per_candle(topics.SCORES, client)
    alerts = bus.once_per_candle(topics.ALERTS, client)
    model_dir = Path(settings.model_dir) if settings.model_dir else Path(settings.data_dir) / "models"
    cache_dir = Path(settings.model_cache_dir) if settings.model_cache_dir else model_dir / ".cache"
    engine = Inference(
        Config(settings.max_batch, settings.max_wait_ms, settings.session_threads, settings.score_window,
               settings.behind_min_samples, settings.behind_ratio, settings.demote_behind),
        metrics, predictions.publish_many, scores.publish_many, alerts.publish_many, bus.dead_letter, rules,
    )
    backfill = Backfill(
        engine, settings.archive_url or str(Path(settings.data_dir) / "archive"),
        metrics.counter("archive_window_candles_total", "Window rows computed from the klines archive", ["interval"]),
        metrics.counter("archive_window_failures_total", "Streams whose archive could not fill their window", ["interval"]),
    )
    charts = ChartServing(engine, client, predictions.publish_many, bus.dead_letter, metrics, settings.session_threads)
    state = {"ready": False, "models_upto": "0-0", "lock": asyncio.Lock(), "scores_restored": False}
    runtime.health.set("model", lambda: state["ready"])

    async def load(spec) -> ServedModel:
        return await asyncio.to_thread(load_model, spec, settings.session_threads)

    async def read_windows(upper: str, floors: dict[str, int] | None = None) -> dict[tuple[str, str], list[FeaturesEvent]]:
        """The last events of every stream on features.v1 up to ``upper``, oldest first: the
        window, plus room for candles left unpublished; with ``floors`` (the once-per-candle
        guard), back to a full window before the oldest candle a model serving the stream has not
        answered, however many a crash left unanswered."""
        cap = engine.windows.capacity
        need = cap + 64
        per_key: dict[tuple[str, str], list[FeaturesEvent]] = {}
        done: set[tuple[str, str]] = set()
        lowest: dict[tuple[str, str], int | None] = {}
        async for _, doc in history.scan_back(client, topics.FEATURES, upper, settings.restore_scan_entries):
            key = (doc.get("symbol"), doc.get("interval"))
            if key in done:
                continue
            try:
                ev = FeaturesEvent.model_validate(doc)
            except ValueError:
                continue  # dead-lettered when it was first consumed
            got = per_key.setdefault(key, [])  # type: ignore[arg-type]
            got.append(ev)
            if len(got) < need:
                continue
            if floors is not None:
                if key not in lowest:
                    marks = [floors.get(f"{ev.symbol}|{ev.interval}|{m.spec.name}") for m in engine.router.route(*key)]
                    known = [t for t in marks if t is not None]
                    lowest[key] = min(known) if known else None
                low = lowest[key]
                if low is not None and sum(e.open_time <= low for e in got[-cap:]) < cap:
                    continue  # not yet a full window at or before the last answered candle
            done.add(key)  # type: ignore[arg-type]
        return {k: v[::-1] for k, v in per_key.items()}

    async def serve(model: ServedModel) -> None:
        if engine.needs_capacity(model.spec.lookback) and state["ready"]:
            # A longer lookback than any served so far: put older rows in front of what the windows hold.
            upper = await history.taken_upper_bound(client, topics.FEATURES, bus.service)
            if upper is not None:
                for key, evs in (await read_windows(upper)).items():
                    engine.windows.refill(key, [(e.open_time, e.close, e.feature_set, e.values) for e in evs])
        old = engine.install(model)
        was = f" (was {old.spec.version})" if old is not None else ""
        log.info("serving %s (%s, %s, lookback %d, %s)%s", model.spec.label, model.spec.kind,
                 model.spec.feature_set or "close", model.spec.lookback,
                 "all pairs" if model.spec.pairs is None else f"{len(model.spec.pairs)} pairs", was)

    async def sync_models() -> None:
        """Serve what the registry and models.v1 say is current (the last promoted announcement of
        each name wins); models already serving that version stay as they are."""
        current = {s.name: s for s in await asyncio.to_thread(
            registry_packages, model_dir, not settings.serve_unpromoted)}
        chart_specs = await charts.registry(model_dir, not settings.serve_unpromoted)
        announced: dict[str, ModelPublished] = {}
        newest = None
        async for eid, doc in history.scan_back(client, topics.MODELS):
            newest = newest or eid
            try:
                ev = ModelPublished.model_validate(doc)
            except ValueError:
                continue
            if (ev.promoted or settings.serve_unpromoted) and ev.model not in announced:
                announced[ev.model] = ev
        for name, ev in announced.items():
            spec = current.get(name)
            if spec is None or spec.version != ev.version or spec.sha256 != ev.sha256:
                try:
                    current[name] = await asyncio.to_thread(load_package, ev.uri, ev.sha256, cache_dir)
                except NotServable:
                    current.pop(name, None)
                    chart_specs.pop(name, None)
                    chart = await charts.fetch(ev, cache_dir)  # None: not a chart classifier either
                    if chart is not None:
                        chart_specs[name] = chart
                except PackageError as exc:
                    engine.m.load_failures.labels(name).inc()
                    log.error("cannot serve %s@%s announced on models.v1: %s", name, ev.version, exc)
                    current.pop(name, None)
                    chart_specs.pop(name, None)
        for spec in current.values():
            serving = engine.router.get(spec.name)
            if serving is not None and serving.spec.version == spec.version and serving.spec.sha256 == spec.sha256:
                continue
            try:
                await serve(await load(spec))
            except PackageError as exc:
                engine.m.load_failures.labels(spec.name).inc()
                log.error("cannot serve %s: %s", spec.label, exc)
        await charts.sync(chart_specs.values())
        if newest is not None and history.id_key(newest) > history.id_key(state["models_upto"]):
            state["models_upto"] = newest

    @runtime.on_startup
    async def load_models() -> None:
        path = ensure_persistence_model(model_dir)
        await serve(await load(persistence_spec(path)))
        await sync_models()
        engine.start()
        state["ready"] = True

    @bus.on_owner
    async def take_over() -> None:
        """Each time this replica becomes the owner (at start; a standby taking over), before it
        consumes: models announced meanwhile, then windows from what the group was handed, with
        forecasts for candles a model had not published. Runs once per ordered group (features.v1,
        models.v1); the second run finds the windows current and keeps them."""
        async with state["lock"]:
            await sync_models()
            upper = await history.taken_upper_bound(client, topics.FEATURES, bus.service)
            if upper is not None:
                floors = await history.last_published(client, topics.PREDICTIONS)
                per_key = await read_windows(upper, floors)
                rebuilt = engine.rebuild(per_key, floors)
                log.info("windows rebuilt for %d of %d streams from features.v1", rebuilt, len(per_key))
            if not state["scores_restored"]:
                await restore_scores()
                state["scores_restored"] = True

    async def restore_scores() -> None:
        n = settings.score_window
        kept: dict[tuple, list[dict]] = {}
        async for _, doc in history.scan_back(client, topics.SCORES, "+", settings.restore_scan_entries):
            try:
                key = (doc["model"], doc["symbol"], doc["interval"], int(doc["horizon"]))
            except (KeyError, TypeError, ValueError):
                continue
            if len(kept.setdefault(key, [])) < n:
                kept[key].append(doc)
        for key, docs in kept.items():
            for d in reversed(docs):
                engine.scorer.restore(key, d["abs_error"], d["baseline_abs_error"], d.get("direction_hit"))
        # Forecasts still waiting for their target candle: all within the newest few candles' forecasts.
        horizon = max((max(m.spec.horizons) for m in engine.router.models()), default=1)
        bound = (len(engine.windows.keys()) or 1) * len(engine.router.models()) * (horizon + 2)
        async for _, doc in history.scan_back(client, topics.PREDICTIONS, "+", bound):
            last = engine.windows.last_open_time((doc.get("symbol"), doc.get("interval")))
            if last is None or doc.get("model") == "persistence":
                continue
            try:
                targets = doc.get("target_open_times") or [doc["target_open_time"]]
                path = doc.get("path") or [doc["predicted"].get("close")]
                horizons = doc.get("horizons") or [doc["horizon"]]
                steps = [(h, t, p) for h, t, p in zip(horizons, targets, path) if t > last and p is not None]
                if steps:
                    engine.scorer.add_forecast(doc["model"], doc["model_version"], doc["symbol"], doc["interval"],
                                               doc["open_time"], doc["last_close"], steps)
            except (KeyError, TypeError, AttributeError):
                continue
        async for _, doc in history.scan_back(client, topics.ALERTS, "+", settings.restore_scan_entries):
            try:
                subject = doc["labels"]["subject"]
                engine.alerts.restore_once(doc["rule"], doc["symbol"], doc["interval"], subject, doc["status"], doc["open_time"])
            except (KeyError, TypeError):
                continue

    @bus.ordered_batch(topics.FEATURES, FeaturesEvent,
                       description="Forecast with every model serving the candle's (symbol, interval); score earlier forecasts.")
    async def on_features(events: list[FeaturesEvent], entry_ids: list[str]) -> None:
        # Hands windows to the models' micro-batchers and returns: a batch of closes from many
        # symbols becomes one session call per model, whatever size the bus delivers.
        metrics.events_in.labels(topics.FEATURES).inc(len(events))
        with metrics.handle_seconds.labels(topics.FEATURES).time():
            repeated = sum(not engine.on_features(ev) for ev in events if not backfill.take(ev))
        if repeated:
            metrics.duplicates.labels(topics.FEATURES).inc(repeated)

    @bus.ordered(topics.MODELS, ModelPublished,
                 description="Verify, load and warm an announced model package, then swap it in between two candles.")
    async def on_model(event: ModelPublished, entry_id: str) -> None:
        metrics.events_in.labels(topics.MODELS).inc()
        if history.id_key(entry_id) <= history.id_key(state["models_upto"]):
            return  # already reflected by the start-up read of models.v1
        if not event.promoted and not settings.serve_unpromoted:
            log.info("%s@%s is not promoted (did not beat its baselines); not served", event.model, event.version)
            return
        current = engine.router.get(event.model)
        if current is not None and current.spec.version == event.version and current.spec.sha256 == event.sha256:
            return
        try:
            spec = await asyncio.to_thread(load_package, event.uri, event.sha256, cache_dir)
            if spec.name != event.model or spec.version != event.version:
                raise PackageError(f"the package at {event.uri} is {spec.label}, not {event.model}@{event.version}")
            model = await load(spec)
        except NotServable as exc:
            if await charts.on_model(event, cache_dir):
                return
            log.info("%s@%s is not served here: %s", event.model, event.version, exc)
            return
        except PackageError as exc:
            engine.m.load_failures.labels(event.model).inc()
            kept = f"; still serving {current.spec.label}" if current is not None else ""
            reason = f"model {event.model}@{event.version} refused: {exc}{kept}"
            log.error("%s", reason)
            await bus.dead_letter(topics.MODELS, event.to_json(), reason)
            return
        await serve(model)

    @bus.ordered(topics.CHARTS, ChartEvent,
                 description="Answer each chart of a chart classifier's preset (PNG + its last candle's text) with class "
                 "probabilities and the next close.")
    async def on_chart(event: ChartEvent, entry_id: str) -> None:
        metrics.events_in.labels(topics.CHARTS).inc()
        await charts.on_chart(event)

    @runtime.on_shutdown
    async def drain() -> None:
        await backfill.drain(settings.drain_timeout_s)
        if not await engine.drain(settings.drain_timeout_s):
            log.warning("stopped with forecasts still queued; they are made again at the next start")
        await engine.stop()
        await client.aclose()

    return runtime
