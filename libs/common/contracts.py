"""Event contracts: the payload of every topic, as pydantic models.

Each model carries ``schema_version``. Additive, optional fields keep the
version; anything else is a new model on a new topic (``klines.v2``), so
consumers never meet a shape they were not written for. Unknown fields are
ignored on read so an additive change never breaks an older consumer.

Times are integer milliseconds since the epoch, UTC, as Binance sends them.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from libs.common import topics
from libs.common.klines import INTERVAL_MS, InvalidKline, Kline, now_ms, validate_kline

Symbol = str
Millis = int


class InvalidEvent(ValueError):
    """A message that is not a valid event of its topic; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Event(BaseModel):
    # NaN and infinities are not numbers any consumer can use: refused on every topic.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    topic: ClassVar[str]

    schema_version: int = 1

    # True when every field is a JSON scalar, or a list/dict of them: the attributes then
    # serialise as they are, ~4x faster than model_dump (every event is serialised once per
    # publish, and a batch of 1000 is published at once). Worked out per class at definition.
    _native_json: ClassVar[bool] = False

    # Fields that hold integers (alone or in a list/tuple): checked to fit in 64 bits, which every
    # consumer's JSON (orjson, Java, Go) can hold; pydantic takes any size, and orjson then fails
    # to write the event again (a TypeError far from the input that caused it).
    _int_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._native_json = all(_json_native(f.annotation) for f in cls.model_fields.values())
        cls._int_fields = tuple(n for n, f in cls.model_fields.items() if _holds_int(f.annotation))

    @model_validator(mode="after")
    def _ints_fit_64_bits(self) -> "Event":
        for name in self._int_fields:
            v = self.__dict__[name]
            if type(v) is int:
                if not _INT64_MIN <= v <= _INT64_MAX:
                    raise ValueError(f"{name} {v} does not fit in 64 bits")
            elif isinstance(v, (list, tuple)) and any(type(x) is int and not _INT64_MIN <= x <= _INT64_MAX for x in v):
                raise ValueError(f"{name} holds an integer that does not fit in 64 bits")
        return self

    def to_json(self) -> bytes:
        if self._native_json:
            return orjson.dumps(self.__dict__)
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Event":
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
            raise InvalidEvent(f"{cls.__name__}: {where}: {first.get('msg')}") from None


_SCALARS = (str, int, float, bool, type(None))
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _holds_int(annotation: Any) -> bool:
    if annotation is int:
        return True
    return any(_holds_int(a) for a in get_args(annotation) if a is not Ellipsis)


def _json_native(annotation: Any) -> bool:
    """A type whose values orjson writes exactly as pydantic's JSON mode does."""
    origin = get_origin(annotation)
    if origin is None:
        return annotation in _SCALARS
    if origin is Literal:
        return all(isinstance(v, _SCALARS) for v in get_args(annotation))
    if origin in (Union, UnionType, list, dict):
        return all(_json_native(a) for a in get_args(annotation))
    return False


class CandleKeyed(Event):
    symbol: Symbol = Field(description="Upper-case exchange symbol, e.g. BTCUSDT.")
    interval: str = Field(description="Binance interval spelling: 1m, 15m, 1h, ...")
    open_time: Millis = Field(description="Open time of the candle (ms since epoch, UTC).")

    @field_validator("symbol")
    @classmethod
    def _upper_symbol(cls, v: str) -> str:
        if not v or v != v.upper() or not v.isalnum():
            raise ValueError(f"symbol must be upper-case alphanumeric, got {v!r}")
        return v

    @field_validator("interval")
    @classmethod
    def _known_interval(cls, v: str) -> str:
        if v not in INTERVAL_MS:
            raise ValueError(f"unknown interval {v!r}")
        return v


class KlineEvent(CandleKeyed):
    """A closed candle. Exactly one per (symbol, interval, open_time) on ``klines.v1``."""

    topic: ClassVar[str] = topics.KLINES

    close_time: Millis
    open: float
    high: float
    low: float
    close: float
    volume: float
    quote_volume: float = 0.0
    trades: int = 0
    taker_buy_base: float = 0.0
    taker_buy_quote: float = 0.0
    source: Literal["ws", "rest", "archive", "replay"] = Field(
        "ws", description="How ingest obtained the candle: live websocket, REST backfill, archive import."
    )
    ingested_at: Millis = Field(default_factory=now_ms, description="When ingest published it.")

    @model_validator(mode="after")
    def _physical(self) -> "KlineEvent":
        # The same rules ingest applies, so a hand-made or foreign producer cannot put an
        # impossible candle on klines.v1 for the archive and features to swallow.
        try:
            validate_kline(self)  # reads the same attributes a Kline has
        except InvalidKline as exc:
            raise ValueError(exc.reason) from None
        return self

    @classmethod
    def from_kline(cls, k: Kline, source: str = "ws") -> "KlineEvent":
        fields = k.to_dict()
        fields.pop("closed")
        return cls(**fields, source=source)

    def to_kline(self) -> Kline:
        return Kline(**self.model_dump(include=_KLINE_FIELDS), closed=True)


_KLINE_FIELDS = set(Kline.__dataclass_fields__) - {"closed"}


class LiveKlineEvent(KlineEvent):
    """An in-progress candle update (``x: false``), on the short, capped ``klines-live.v1``."""

    topic: ClassVar[str] = topics.KLINES_LIVE
    closed: bool = False


class FeaturesEvent(CandleKeyed):
    """Indicator values computed when a candle closed."""

    topic: ClassVar[str] = topics.FEATURES

    close: float = Field(description="Close of the candle the values belong to.")
    feature_set: str = Field(description="Name of the versioned feature list, e.g. all-v1.")
    values: dict[str, float] = Field(
        description="Indicator name -> value. Only warmed-up indicators appear; never NaN."
    )
    warm: bool = Field(
        description="True once every indicator of the feature set is warmed up; models wait for it."
    )
    kline_ingested_at: Millis | None = Field(None, description="Carried from the kline, for latency.")
    computed_at: Millis = Field(default_factory=now_ms)
    feature_origin: Millis | None = Field(
        None, description="Open time of the first candle the indicators were computed from (cumulative "
        "features such as obv and vpt depend on it); absent when the producer does not say. Inference refuses "
        "a window of another origin for a model trained on cumulative features.")

    @classmethod
    def prepared(
        cls, symbol: str, interval: str, open_time: int, close: float, feature_set: str,
        values: dict[str, float], warm: bool, kline_ingested_at: int | None, computed_at: int,
        feature_origin: int | None = None,
    ) -> "Prepared":
        """The event's JSON written directly, for the features service's hot path (1000 events a
        batch; building and validating a model with 49 values cost ~4 us of ~24 per event).
        The caller vouches for the types and for finite values (it checks a batch's values at
        once); the bytes equal ``FeaturesEvent(...).to_json()`` (tested)."""
        payload = orjson.dumps({
            "schema_version": 1, "symbol": symbol, "interval": interval, "open_time": open_time,
            "close": close, "feature_set": feature_set, "values": values, "warm": warm,
            "kline_ingested_at": kline_ingested_at, "computed_at": computed_at, "feature_origin": feature_origin,
        })
        return Prepared(symbol, interval, open_time, payload)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A candle-keyed event already serialised by its producer: what a publisher needs of it
    (its identity for the once-per-candle guard, and its bytes)."""

    symbol: str
    interval: str
    open_time: int
    payload: bytes

    def to_json(self) -> bytes:
        return self.payload


class ChartRequest(Event):
    """Asks the charts service for a chart of one symbol now."""

    topic: ClassVar[str] = topics.CHART_REQUESTS

    symbol: Symbol
    interval: str
    window: int | None = Field(None, description="Candles shown; the service default when omitted.")
    preset: str = Field("analysis", description="'analysis' (panels, seed 000) or 'classifier224'.")
    requested_by: str = ""
    requested_at: Millis = Field(default_factory=now_ms)


class ChartEvent(CandleKeyed):
    """A rendered chart. ``open_time`` is that of the last candle shown."""

    topic: ClassVar[str] = topics.CHARTS

    uri: str = Field(description="Where the PNG is (file://, s3://, ... any fsspec URL).")
    window: int
    first_open_time: Millis
    preset: str
    width: int
    height: int
    indicators: dict[str, float] = Field(default_factory=dict, description="Last values shown.")
    patterns: list[str] = Field(default_factory=list, description="Patterns marked on the chart.")
    rendered_at: Millis = Field(default_factory=now_ms)


class PredictionEvent(CandleKeyed):
    """A model's forecast made when the candle at ``open_time`` closed."""

    topic: ClassVar[str] = topics.PREDICTIONS

    model: str = Field(description="Model name, e.g. persistence, bilstm-ohlc, lstm-close.")
    model_version: str
    target_open_time: Millis = Field(description="Open time of the candle being forecast.")
    horizon: int = Field(1, description="Candles ahead.")
    predicted: dict[str, float] = Field(description="Forecast values, e.g. {'close': 70123.4}.")
    last_close: float
    kline_ingested_at: Millis | None = None
    predicted_at: Millis = Field(default_factory=now_ms)
    horizons: list[int] | None = Field(None, description="Every horizon forecast (candles ahead), e.g. 1..7.")
    target_open_times: list[Millis] | None = Field(None, description="Open time of the candle each horizon forecasts.")
    path: list[float] | None = Field(None, description="Forecast close at each of ``horizons`` (multi-step models).")
    probabilities: dict[str, float] | None = Field(None, description="Class probabilities (classifier models).")
    close_to_publish_ms: int | None = Field(
        None, description="Milliseconds from the candle's close (open_time + interval) to this forecast's publish."
    )
    role: Literal["primary", "shadow"] = Field(
        "primary", description="'shadow': the model is behind persistence and demoted; still scored, not the answer."
    )
    target: str = Field(
        "price", description="What ``predicted`` holds: 'price' (open/high/low/close in quote units), 'range' "
        "(a range/volatility model: 'range' = the next candle's high - low in quote units, 'rvol<N>' = realised "
        "volatility of the next N candles, sqrt(sum of squared log returns of the closes), unitless) or 'class'.")
    quantiles: dict[str, dict[str, float]] | None = Field(
        None, description="Prediction interval per forecast column '<target>@<horizon>' (close@1, close@7, "
        "range@1, rvol@16): quantile level ('0.1', '0.5', '0.9') -> value in the target's units, split-conformal "
        "on a gate slice the model never trained or tuned on. The 80 % interval is ['0.1', '0.9']; '0.5' is the "
        "calibrated median, which may differ from ``predicted``. Absent for models without calibrated intervals.")


class ScoreEvent(CandleKeyed):
    """A forecast judged when its target candle closed, beside persistence. ``open_time`` is the
    target candle's; rolling values cover the last ``window`` scores of (model, symbol, interval, horizon)."""

    topic: ClassVar[str] = topics.SCORES

    model: str
    model_version: str
    horizon: int = Field(description="Candles ahead the forecast was made for.")
    forecast_open_time: Millis = Field(description="Open time of the candle the forecast was made at.")
    predicted_close: float
    actual_close: float
    baseline_close: float = Field(description="Persistence's forecast: the close at forecast_open_time.")
    abs_error: float
    baseline_abs_error: float
    direction_hit: bool | None = Field(None, description="Moved the way the market did; None when the market was flat.")
    window: int = Field(description="Scores in the rolling values (at most the configured window).")
    rolling_mae: float
    rolling_baseline_mae: float
    mae_ratio: float | None = Field(None, description="rolling_mae / rolling_baseline_mae; above 1: behind persistence.")
    direction_accuracy: float | None = Field(None, description="Rolling hit rate over non-flat candles.")
    behind: bool = Field(False, description="Behind persistence over the agreed window (enough scores, ratio above the limit).")
    scored_at: Millis = Field(default_factory=now_ms)
    target: str = Field(
        "close", description="What predicted_close / actual_close / baseline_close hold: 'close' (price), 'range' "
        "(next candle's high - low) or 'rvol<N>' (realised volatility of the N candles after forecast_open_time); "
        "the baseline is persistence of the same quantity (last close, last range, realised vol of the last N).")
    lower: float | None = Field(None, description="The forecast's 80 % interval (its '0.1' quantile), when it has one.")
    upper: float | None = Field(None, description="The forecast's 80 % interval (its '0.9' quantile).")
    covered: bool | None = Field(None, description="lower <= actual <= upper; None without an interval.")
    band_width: float | None = Field(None, description="(upper - lower) / predicted: the interval's relative width.")
    baseline_lower: float | None = Field(
        None, description="Persistence with the gate slice's empirical 10 % quantile (the interval baseline).")
    baseline_upper: float | None = Field(None, description="Persistence with the gate slice's empirical 90 % quantile.")
    baseline_covered: bool | None = None
    baseline_band_width: float | None = Field(None, description="(baseline_upper - baseline_lower) / baseline_close.")
    interval_window: int | None = Field(None, description="Scores with an interval in the rolling coverage values.")
    rolling_coverage: float | None = Field(
        None, description="Share of the rolling window's actuals inside the 80 % interval (target 0.8).")
    rolling_band_width: float | None = Field(None, description="Mean band_width over the same scores.")
    rolling_baseline_coverage: float | None = None
    rolling_baseline_band_width: float | None = None


class AnalysisEvent(CandleKeyed):
    """A vision-language model's structured reading of a chart."""

    topic: ClassVar[str] = topics.ANALYSES

    chart_uri: str
    model: str
    trend: Literal["bullish", "bearish", "sideways", "unknown"]
    confidence: float = Field(ge=0.0, le=1.0)
    support: list[float] = Field(default_factory=list)
    resistance: list[float] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)
    summary: str = ""
    analysed_at: Millis = Field(default_factory=now_ms)
    signal: Literal["buy", "sell", "hold"] | None = Field(None, description="The call for the next candles.")
    model_revision: str = Field("", description="Model revision: a pinned Hugging Face commit, 'local' or 'remote'.")
    backend: str = Field("", description="local (in-process llama.cpp) or remote (OpenAI-compatible server).")
    prompt_version: str = Field("", description="Version of the prompt and answer schema.")
    attempts: int = Field(1, ge=1, description="Model calls used (2: the first answer was refused and retried).")
    price_low: float | None = Field(None, description="Lowest low of the candles charted (levels lie within).")
    price_high: float | None = Field(None, description="Highest high of the candles charted.")
    last_close: float | None = Field(None, description="Close of the last candle charted (the call's entry).")
    timings_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Milliseconds: image_prep (read + downscale), image_encode (vision encoder and its "
        "embeddings into the context), prompt (text prompt evaluation), generation, total (model calls); "
        "summed over attempts. A remote backend reports what its server says.",
    )


class AlertEvent(Event):
    """A fired alert rule."""

    topic: ClassVar[str] = topics.ALERTS

    rule: str
    severity: Literal["info", "warning", "critical"]
    symbol: Symbol | None = None
    interval: str | None = None
    open_time: Millis | None = None
    message: str
    value: float | None = None
    threshold: float | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    fired_at: Millis = Field(default_factory=now_ms)
    status: Literal["firing", "resolved"] = Field(
        "firing",
        description="'resolved' when the rule's condition cleared; the alerts service then resolves it "
        "(Alertmanager endsAt, a resolved message in chat). An alert of the same rule/symbol/interval/labels "
        "that is not fired again within its candle's interval resolves by itself.",
    )


class DatasetBuildRequest(Event):
    """Build a dataset from the archive and train a model on it."""

    topic: ClassVar[str] = topics.DATASETS

    request_id: str
    model_kind: Literal["bilstm-ohlc", "lstm-close", "chart-classifier"]
    symbols: list[Symbol]
    intervals: list[str]
    start: Millis
    end: Millis
    feature_set: str
    horizon: int = 1
    requested_at: Millis = Field(default_factory=now_ms)
    signature: str | None = Field(
        None,
        description="<key-id>:<hex HMAC-SHA256> over the event's canonical bytes (libs/common/signing.py); "
        "consumers refuse an event without a valid one (docs/threat-model.md, Control topics).",
    )


class ModelPublished(Event):
    """A trained and evaluated model; ``promoted`` only if it beat its baselines."""

    topic: ClassVar[str] = topics.MODELS

    model: str
    version: str
    uri: str
    sha256: str = Field(description="sha256 of the package's klinebus.manifest.json (every file's sha256).")
    feature_set: str
    train_range: tuple[Millis, Millis]
    eval_range: tuple[Millis, Millis]
    metrics: dict[str, float]
    baseline_metrics: dict[str, dict[str, float]]
    promoted: bool
    published_at: Millis = Field(default_factory=now_ms)
    signature: str | None = Field(
        None,
        description="<key-id>:<hex HMAC-SHA256> over the event's canonical bytes (libs/common/signing.py); "
        "consumers refuse an event without a valid one (docs/threat-model.md, Control topics).",
    )


class DeadLetter(Event):
    """A message some service could not use. ``payload`` is the message as received."""

    topic: ClassVar[str] = topics.DEAD_LETTERS

    source: str = Field(description="Topic or input the message came from (e.g. klines.v1, binance-ws).")
    service: str
    reason: str = Field(description="One line: why the message was refused.")
    payload: str
    received_at: Millis = Field(default_factory=now_ms)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.topic: cls
    for cls in (
        KlineEvent,
        LiveKlineEvent,
        FeaturesEvent,
        ChartRequest,
        ChartEvent,
        PredictionEvent,
        ScoreEvent,
        AnalysisEvent,
        AlertEvent,
        DatasetBuildRequest,
        ModelPublished,
        DeadLetter,
    )
}


def payload_preview(raw: Any, limit: int = 4096) -> str:
    """A dead letter keeps the message as received, truncated so one bad blob cannot bloat Redis."""
    if isinstance(raw, (bytes, bytearray)):
        text = bytes(raw).decode("utf-8", errors="replace")
    elif isinstance(raw, str):
        text = raw
    else:
        try:
            text = orjson.dumps(raw, default=str).decode()
        except TypeError:
            text = repr(raw)
    return text if len(text) <= limit else text[:limit] + f"...(+{len(text) - limit} chars)"
