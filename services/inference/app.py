"""Inference service: features.v1 -> every promoted ONNX model + persistence -> predictions.v1,
scores.v1, alerts.v1; models.v1 hot-reloads models.

Three layers, each knowing only the one below:

* ``server.Inference``, the domain state (windows, one supervised micro-batcher per model,
  one supervised outbox per topic, live scores, alert rules): no Redis, unit-tested alone; it
  reaches the bus only through a ``server.Port``.
* ``InferenceService``, the component: its lifecycle is the service's (``start``: load the
  registry's models; ``take_over(partition)``: each time this replica takes a partition of
  features.v1, rebuild that partition's streams' state from the topics; ``on_features``: one
  batch; ``release(partition)``: a partition given to another replica, its streams' forecasts
  published, then their state dropped; ``stop``: drain). It reads the streams' history
  (models.v1, features.v1, scores.v1, ...) to restore state, and holds the ``BusPort``.
  Losing a partition's lease (no ``release``) needs no step: ``take_over`` drops whatever the
  replica still holds of that partition before rebuilding it.
* ``create``: the faststream-shaped edge; it declares the topics and routes each handler to
  the component. features.v1 is consumed per owned partition; models.v1 by every replica
  (``bus.broadcast``: each one serves every model); charts.v1 with partition 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from libs.common import topics
from libs.common.bus import classify, redis_client
from libs.common.bus.failures import INFRASTRUCTURE
from libs.common.cpus import available_cpus
from libs.common.contracts import AlertEvent, ChartEvent, FeaturesEvent, ModelPublished, PredictionEvent, ScoreEvent
from libs.common.service import ServiceRuntime
from libs.common.settings import SettingsError
from libs.common.signing import ControlGuard, Keyring
from libs.common.artefacts import ArtefactRoot
from services.inference import history
from services.inference.alert_rules import Rule, RulesError, load_rules
from services.inference.backfill import Backfill
from services.inference.charts import ChartServing
from services.inference.baseline import ensure_persistence_model, persistence_spec
from services.inference.package import NotServable, PackageError, load_package, model_sources, registry_packages
from services.inference.server import Config, Inference, ServedModel, load_model
from services.inference.settings import InferenceSettings

SETTINGS = InferenceSettings
log = logging.getLogger("klinebus.inference")


class BusPort:
    """``server.Port`` on the real bus: once-per-candle publishers, the dead-letter stream, and the
    bus's own classification of failures (``libs.common.bus.failures``)."""

    def __init__(self, runtime: ServiceRuntime, client: Any) -> None:
        bus = runtime.bus
        self._bus = bus
        self.predictions = bus.once_per_candle(topics.PREDICTIONS, client)
        self.scores = bus.once_per_candle(topics.SCORES, client)
        self.alerts = bus.once_per_candle(topics.ALERTS, client)

    async def publish_predictions(self, events: Sequence[PredictionEvent], *key: str) -> Any:
        return await self.predictions.publish_many(events, *key)

    async def publish_scores(self, events: Sequence[ScoreEvent], *key: str) -> Any:
        return await self.scores.publish_many(events, *key)

    async def publish_alerts(self, events: Sequence[AlertEvent], *key: str) -> Any:
        return await self.alerts.publish_many(events, *key)

    async def dead_letter(self, source: str, raw: Any, reason: str) -> None:
        await self._bus.dead_letter(source, raw, reason)

    def transient(self, exc: BaseException) -> bool:
        return classify(exc) == INFRASTRUCTURE


class InferenceService:
    """The inference component; see the module docstring for its lifecycle."""

    def __init__(self, runtime: ServiceRuntime, settings: InferenceSettings, rules: Sequence[Rule]) -> None:
        self.runtime = runtime
        self.settings = settings
        self.bus = runtime.bus
        self.client = redis_client(runtime.url)
        self.port = BusPort(runtime, self.client)
        self.model_dir = Path(settings.model_dir) if settings.model_dir else Path(settings.data_dir) / "models"
        self.cache_dir = model_sources(settings, self.model_dir)  # announced packages: only from these roots
        metrics = runtime.metrics
        self.control = ControlGuard(Keyring.parse(settings.control_keys), metrics, self.bus.dead_letter)  # signed models.v1
        self.engine = Inference(
            Config(settings.max_batch, settings.max_wait_ms, settings.session_threads, settings.score_window,
                   settings.behind_min_samples, settings.behind_ratio, settings.demote_behind, settings.session_calls),
            metrics, self.port, rules,
        )
        self.backfill = Backfill(
            self.engine, settings.archive_url or str(Path(settings.data_dir) / "archive"),
            metrics.counter("archive_window_candles_total", "Window rows computed from the klines archive", ["interval"]),
            metrics.counter("archive_window_failures_total", "Streams whose archive could not fill their window",
                            ["interval"]),
        )
        self.charts = ChartServing(self.engine, self.client, self.port.predictions.publish_many, self.bus.dead_letter,
                                   metrics, settings.session_threads,
                                   artefacts=ArtefactRoot(settings.artifact_root(), settings.max_chart_bytes, metrics),
                                   partitions=self.bus.partitions)
        self.ready = False
        self.models_upto = "0-0"
        self.owned: set[int] = set()  # partitions whose state this replica holds (restored, not released)
        self.restoring: set[int] = set()
        # Model swaps, partition take-overs and releases one at a time: each reads or drops windows.
        self._lock = asyncio.Lock()
        runtime.health.set("model", lambda: self.ready)
        # Not ready while a partition it took is being restored: its events wait meanwhile.
        runtime.health.set("partitions", lambda: not self.restoring)
        self._streams = metrics.gauge("partition_streams", "Streams (symbol, interval) held per owned partition of "
                                      "features.v1", ["partition"])
        self._watch_workers()

    def _watch_workers(self) -> None:
        # One readiness check per worker, so /readyz names the batcher or outbox that is down.
        for w in self.engine.workers():
            self.runtime.health.set(w.name, lambda w=w: w.ok)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Before consuming: persistence plus every servable registry model, then the workers."""
        self.control.warn_unconfigured("inference", [topics.MODELS])  # one line at start when there is no key
        self._warn_oversubscribed()
        path = ensure_persistence_model(self.model_dir)
        await self._serve(await self._load(persistence_spec(path)))
        await self._sync_models()
        self.engine.start()
        self.ready = True

    def _warn_oversubscribed(self) -> None:
        """One line at start when a model's session calls x their threads want more cores than
        this process may use (its cgroup's quota: the pod's CPU limit): they would be throttled,
        not run side by side."""
        s = self.settings
        want, cpus = s.session_calls * s.session_threads, available_cpus()
        if want > cpus:
            log.warning("KLINEBUS_SESSION_CALLS=%d x KLINEBUS_SESSION_THREADS=%d wants %d cores per model but this "
                        "process may use %.1f (CPU limit or affinity); the calls will share them. Set their "
                        "product to the pod's CPU limit (docs/inference.md, Settings)",
                        s.session_calls, s.session_threads, want, cpus)

    def _belongs(self, partition: int) -> Callable[[tuple[str, str]], bool]:
        of = self.bus.partition_of
        return lambda key: of(key[0], key[1]) == partition

    async def take_over(self, partition: int) -> None:
        """Each time this replica takes ``partition`` of features.v1 (at start; a rebalance; a dead
        replica's partition), before it consumes it: models announced meanwhile, then that
        partition's streams from the topics: rolling scores, alert states, windows from what the
        group was handed (with forecasts for candles a model had not published), forecasts still
        waiting for their target. Whatever the replica still held of the partition (a lease lost
        earlier, so never released) is dropped first. Idempotent: the bus runs it again whole
        after an infrastructure failure."""
        belongs = self._belongs(partition)
        async with self._lock:
            self.restoring.add(partition)
            try:
                await self._sync_models()
                # Forecasts of an earlier ownership still in flight must not land in the state rebuilt here.
                await self.engine.settle(belongs, self.settings.drain_timeout_s)
                self.backfill.forget(belongs)
                self.engine.forget(belongs)
                await self._restore_scores(belongs)
                await self._restore_alerts(belongs)
                floors = await history.last_published(self.client, topics.PREDICTIONS)
                upper = await history.taken_upper_bound(self.client, topics.FEATURES, self.bus.service, partition)
                if upper is not None:
                    per_key = await self._read_windows(upper, floors, partition)
                    self.engine.rebuild(per_key, floors)
                    log.info("partition %d: windows rebuilt for %d streams from features.v1", partition, len(per_key))
                await self._restore_pending(belongs, floors)
                self.owned.add(partition)
                self._streams.labels(str(partition)).set_function(
                    lambda: sum(1 for k in self.engine.windows.keys() if belongs(k)))
            finally:
                self.restoring.discard(partition)

    async def release(self, partition: int) -> None:
        """``partition`` goes to another replica (its last batch acknowledged, the lease still
        ours): the forecasts, scores and alerts owed for its streams are published first, so the
        next owner finds them on the streams and makes none of them again; then the streams'
        state is dropped."""
        belongs = self._belongs(partition)
        timeout = self.settings.drain_timeout_s
        async with self._lock:
            self.owned.discard(partition)
            with contextlib.suppress(KeyError):
                self._streams.remove(str(partition))
            await self.backfill.settle(belongs, timeout)
            if not await self.engine.settle(belongs, timeout):
                log.warning("partition %d released with %d forecasts/events unpublished after %.0fs; its next owner "
                            "makes them", partition, self.engine.owed(belongs), timeout)
            self.backfill.forget(belongs)
            if not self.bus.running:
                return  # stopping: the state goes with the process, and /metrics keeps the last scores till then
            dropped = self.engine.forget(belongs)
            log.info("partition %d released: %d streams dropped", partition, len(dropped))

    async def on_features(self, events: list[FeaturesEvent]) -> int:
        """One batch: hands windows to the models' micro-batchers and returns (a batch of closes
        from many symbols becomes one session call per model, whatever size the bus delivers).
        Returns how many were re-deliveries."""
        return sum(not self.engine.on_features(ev) for ev in events if not self.backfill.take(ev))

    async def on_model(self, event: ModelPublished, entry_id: str) -> None:
        """An announcement on models.v1, seen by every replica: verified, loaded, then swapped in."""
        if not await self.control.admit(topics.MODELS, event):
            return  # unsigned or forged: dead-lettered, counted
        if history.id_key(entry_id) <= history.id_key(self.models_upto):
            return  # already reflected by the start-up read of models.v1
        if not event.promoted and not self.settings.serve_unpromoted:
            log.info("%s@%s is not promoted (did not beat its baselines); not served", event.model, event.version)
            return
        current = self.engine.router.get(event.model)
        if current is not None and current.spec.version == event.version and current.spec.sha256 == event.sha256:
            return
        try:
            spec = await asyncio.to_thread(load_package, event.uri, event.sha256, self.cache_dir)
            if spec.name != event.model or spec.version != event.version:
                raise PackageError(f"the package at {event.uri} is {spec.label}, not {event.model}@{event.version}")
            model = await self._load(spec)
        except NotServable as exc:
            if await self.charts.on_model(event, self.cache_dir):
                return
            log.info("%s@%s is not served here: %s", event.model, event.version, exc)
            return
        except PackageError as exc:
            self.engine.m.load_failures.labels(event.model).inc()
            current = current or self.charts.models.get(event.model)  # a package refused before its kind is known
            kept = f"; still serving {current.spec.label}" if current is not None else ""
            reason = f"model {event.model}@{event.version} refused: {exc}{kept}"
            log.error("%s", reason)
            await self.bus.dead_letter(topics.MODELS, event.to_json(), reason)
            return
        async with self._lock:
            await self._serve(model)

    async def on_charts(self, events: list[ChartEvent]) -> None:
        """A delivery of charts: one session call per chart model for all of them."""
        await self.charts.on_charts(events)

    async def stop(self) -> None:
        s = self.settings
        await self.backfill.drain(s.drain_timeout_s)
        if not await self.engine.drain(s.drain_timeout_s):
            log.warning("stopped with forecasts still queued; they are made again at the next start")
        await self.engine.stop()
        await self.charts.stop()  # its batchers' threads end with the service
        await self.client.aclose()

    # --- models ---------------------------------------------------------------------------------

    async def _load(self, spec) -> ServedModel:
        return await asyncio.to_thread(load_model, spec, self.settings.session_threads, self.settings.model_variant)

    async def _serve(self, model: ServedModel) -> None:
        """Swap ``model`` in (callers hold ``_lock``, or run before consuming)."""
        engine = self.engine
        if engine.needs_capacity(model.spec.lookback) and self.ready:
            # A longer lookback than any served so far: put older rows in front of what the windows
            # of the partitions held here have.
            for partition in sorted(self.owned):
                upper = await history.taken_upper_bound(self.client, topics.FEATURES, self.bus.service, partition)
                if upper is None:
                    continue
                for key, evs in (await self._read_windows(upper, None, partition)).items():
                    engine.windows.refill(key, [(e.open_time, e.close, e.feature_set, e.values) for e in evs])
        old = engine.install(model)
        self._watch_workers()
        was = f" (was {old.spec.version})" if old is not None else ""
        log.info("serving %s (%s, %s, lookback %d, %s)%s", model.spec.label, model.spec.kind,
                 model.spec.feature_set or "close", model.spec.lookback,
                 "all pairs" if model.spec.pairs is None else f"{len(model.spec.pairs)} pairs", was)

    async def _sync_models(self) -> None:
        """Serve what the registry and models.v1 say is current (the last promoted announcement of
        each name wins); models already serving that version stay as they are."""
        s, engine = self.settings, self.engine
        current = {spec.name: spec for spec in await asyncio.to_thread(
            registry_packages, self.model_dir, not s.serve_unpromoted)}
        chart_specs = await self.charts.registry(self.model_dir, not s.serve_unpromoted)
        announced: dict[str, ModelPublished] = {}
        newest = None
        async for eid, doc in history.scan_back(self.client, topics.MODELS):
            newest = newest or eid
            try:
                ev = ModelPublished.model_validate(doc)
            except ValueError:
                continue
            if self.control.check(topics.MODELS, ev) is not None:
                continue  # unsigned or forged: dead-lettered when on_model meets it
            if (ev.promoted or s.serve_unpromoted) and ev.model not in announced:
                announced[ev.model] = ev
        for name, ev in announced.items():
            spec = current.get(name)
            if spec is None or spec.version != ev.version or spec.sha256 != ev.sha256:
                try:
                    current[name] = await asyncio.to_thread(load_package, ev.uri, ev.sha256, self.cache_dir)
                except NotServable:
                    current.pop(name, None)
                    chart_specs.pop(name, None)
                    chart = await self.charts.fetch(ev, self.cache_dir)  # None: not a chart classifier either
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
                await self._serve(await self._load(spec))
            except PackageError as exc:
                engine.m.load_failures.labels(spec.name).inc()
                log.error("cannot serve %s: %s", spec.label, exc)
        await self.charts.sync(chart_specs.values())
        if newest is not None and history.id_key(newest) > history.id_key(self.models_upto):
            self.models_upto = newest

    # --- state from the streams ------------------------------------------------------------------

    async def _read_windows(self, upper: str, floors: dict[str, int] | None,
                            partition: int) -> dict[tuple[str, str], list[FeaturesEvent]]:
        """The last events of every stream on features.v1's ``partition`` up to ``upper``, oldest
        first: the window, plus room for candles left unpublished; with ``floors`` (the
        once-per-candle guard), back to a full window before the oldest candle a model serving the
        stream has not answered, however many a crash left unanswered."""
        engine = self.engine
        cap = engine.windows.capacity
        need = cap + 64
        per_key: dict[tuple[str, str], list[FeaturesEvent]] = {}
        done: set[tuple[str, str]] = set()
        lowest: dict[tuple[str, str], int | None] = {}
        async for _, doc in history.scan_back(self.client, topics.FEATURES, upper, self.settings.restore_scan_entries,
                                              partition):
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

    async def _restore_scores(self, belongs: Callable[[tuple[str, str]], bool]) -> None:
        """The rolling scores of the selected streams, from scores.v1 (one stream for every partition)."""
        engine, s = self.engine, self.settings
        n = s.score_window
        kept: dict[tuple, list[dict]] = {}
        async for _, doc in history.scan_back(self.client, topics.SCORES, "+", s.restore_scan_entries):
            try:
                key = (doc["model"], doc["symbol"], doc["interval"], int(doc["horizon"]))
            except (KeyError, TypeError, ValueError):
                continue
            if not belongs((key[1], key[2])):
                continue
            if len(kept.setdefault(key, [])) < n:
                kept[key].append(doc)
        for key, docs in kept.items():
            for d in reversed(docs):
                iv = None
                if d.get("covered") is not None and d.get("band_width") is not None:
                    iv = (bool(d["covered"]), float(d["band_width"]), d.get("baseline_covered"), d.get("baseline_band_width"))
                engine.scorer.restore(key, d["abs_error"], d["baseline_abs_error"], d.get("direction_hit"), iv)

    async def _restore_alerts(self, belongs: Callable[[tuple[str, str]], bool]) -> None:
        """The newest alert of each subject of the selected streams, from alerts.v1: an active one is
        not fired twice, and the state an earlier ownership left is overwritten."""
        seen: set[tuple[str, str, str, str]] = set()
        async for _, doc in history.scan_back(self.client, topics.ALERTS, "+", self.settings.restore_scan_entries):
            try:
                subject = doc["labels"]["subject"]
                who = (doc["rule"], doc["symbol"], doc["interval"], subject)
                if who in seen or not belongs((doc["symbol"], doc["interval"])):
                    continue
                seen.add(who)
                self.engine.alerts.restore(*who, doc["status"], doc["open_time"])
            except (KeyError, TypeError):
                continue

    async def _restore_pending(self, belongs: Callable[[tuple[str, str]], bool], floors: dict[str, int]) -> None:
        """Forecasts of the selected streams still waiting for their target candle, from
        predictions.v1 (one stream for every partition). Only those published before ``floors``
        was read: a forecast the rebuild made is already waiting. Per (stream, model) the stream
        holds forecasts in candle order, so the scan of one ends at its first forecast whose every
        target has closed."""
        engine = self.engine
        last: dict[tuple[str, str, str], int] = {}
        for key in engine.windows.keys():
            held = engine.windows.last_open_time(key)
            if held is None or not belongs(key):
                continue
            for m in engine.router.route(*key):
                # A model that never published for the stream has nothing waiting (and would keep
                # the scan going to its limit).
                if m.spec.kind != "persistence" and f"{key[0]}|{key[1]}|{m.spec.name}" in floors:
                    last[(key[0], key[1], m.spec.name)] = held
        if not last:
            return
        async for _, doc in history.scan_back(self.client, topics.PREDICTIONS, "+", self.settings.restore_scan_entries):
            who = (doc.get("symbol"), doc.get("interval"), doc.get("model"))
            held = last.get(who)  # type: ignore[arg-type]
            if held is None:
                continue
            try:
                floor = floors.get(f"{who[0]}|{who[1]}|{who[2]}")
                if floor is None or int(doc["open_time"]) > floor:
                    continue
                if max(doc.get("target_open_times") or [doc["target_open_time"]]) <= held:
                    del last[who]  # type: ignore[arg-type]
                    if not last:
                        return
                    continue
                engine.restore_pending(doc, held)
            except (KeyError, TypeError, AttributeError, ValueError):
                continue


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
    service = InferenceService(runtime, settings, rules)
    runtime.inference = service  # type: ignore[attr-defined]  # for tests and the demo

    @runtime.on_startup
    async def load_models() -> None:
        await service.start()

    @bus.on_owner
    async def take_over(partition: int) -> None:
        await service.take_over(partition)

    @bus.on_release
    async def release(partition: int) -> None:
        await service.release(partition)

    @bus.ordered_batch(topics.FEATURES, FeaturesEvent,
                       description="Forecast with every model serving the candle's (symbol, interval); score earlier forecasts.")
    async def on_features(events: list[FeaturesEvent], entry_ids: list[str]) -> None:
        metrics.events_in.labels(topics.FEATURES).inc(len(events))
        with metrics.handle_seconds.labels(topics.FEATURES).time():
            repeated = await service.on_features(events)
        if repeated:
            metrics.duplicates.labels(topics.FEATURES).inc(repeated)

    # From the last announcement the start-up read (``models_upto``): one made while the start-up
    # loaded models is read, not lost on a replica that owns no partition (whose take-over would
    # read models.v1 again).
    @bus.broadcast(topics.MODELS, ModelPublished,
                   description="Every replica: verify, load and warm an announced model package, then swap it in "
                   "between two candles.", since=lambda: service.models_upto)
    async def on_model(event: ModelPublished, entry_id: str) -> None:
        metrics.events_in.labels(topics.MODELS).inc()
        await service.on_model(event, entry_id)

    @bus.ordered_batch(topics.CHARTS, ChartEvent,
                       description="Answer each chart of a chart classifier's preset (PNG + its last candle's text) "
                       "with class probabilities and the next close.")
    async def on_charts(events: list[ChartEvent], entry_ids: list[str]) -> None:
        metrics.events_in.labels(topics.CHARTS).inc(len(events))
        await service.on_charts(events)

    @runtime.on_shutdown
    async def drain() -> None:
        await service.stop()

    return runtime
