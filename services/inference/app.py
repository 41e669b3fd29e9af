"""Inference service: features.v1 -> ONNX model -> predictions.v1."""

from __future__ import annotations

from pathlib import Path

from libs.common import topics
from libs.common.bus import redis_client
from libs.common.contracts import FeaturesEvent, PredictionEvent
from libs.common.service import ServiceRuntime
from services.inference.settings import InferenceSettings
from services.inference.baseline import (
    INPUT_NAME,
    OUTPUT_NAME,
    PERSISTENCE,
    PERSISTENCE_VERSION,
    WINDOW,
    ensure_persistence_model,
)
from services.inference.model_runner import LoadedModel, OnnxRunner
from services.inference.predictor import Predictor

SETTINGS = InferenceSettings


def create(settings: InferenceSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime(
        "inference", settings, url, description="Serves ONNX models on closed-candle features; publishes forecasts."
    )
    bus, metrics = runtime.bus, runtime.metrics
    bus.publisher(topics.PREDICTIONS, PredictionEvent)
    client = redis_client(url)
    out = bus.once_per_candle(topics.PREDICTIONS, client)
    model_dir = Path(settings.model_dir) if settings.model_dir else Path(settings.data_dir) / "models"
    state: dict[str, Predictor] = {}
    runtime.health.set("model", lambda: "predictor" in state)

    @runtime.on_startup
    async def load_models() -> None:
        path = ensure_persistence_model(model_dir)
        model = LoadedModel(PERSISTENCE, PERSISTENCE_VERSION, path, WINDOW, INPUT_NAME, OUTPUT_NAME)
        state["predictor"] = Predictor(OnnxRunner(model))

    @bus.ordered(topics.FEATURES, FeaturesEvent, description="Forecast the next candle when a candle's features arrive.")
    async def on_features(event: FeaturesEvent, entry_id: str) -> None:
        metrics.events_in.labels(topics.FEATURES).inc()
        predictor = state["predictor"]
        with metrics.handle_seconds.labels(topics.FEATURES).time():
            if not predictor.accept(event.symbol, event.interval, event.open_time, event.close):
                # A retry after a failed publish publishes it again; anything else is a re-delivery.
                if not await out.retry_last(event.symbol, event.interval, event.open_time, predictor.runner.model.name):
                    metrics.duplicates.labels(topics.FEATURES).inc()
                return
            forecast = predictor.forecast(event.symbol, event.interval, event.open_time)
            if forecast is None:
                return
            model = predictor.runner.model
            await out.publish(
                PredictionEvent(
                    symbol=forecast.symbol,
                    interval=forecast.interval,
                    open_time=forecast.open_time,
                    model=model.name,
                    model_version=model.version,
                    target_open_time=forecast.target_open_time,
                    predicted={"close": forecast.predicted_close},
                    last_close=forecast.last_close,
                    kline_ingested_at=event.kline_ingested_at,
                ),
                model.name,
            )

    @runtime.on_shutdown
    async def close_client() -> None:
        await client.aclose()

    return runtime
