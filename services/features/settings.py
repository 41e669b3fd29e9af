from __future__ import annotations

from pydantic import Field, field_validator

from libs.common.settings import ServiceSettings
from libs.indicators.feature_sets import UnknownFeatureSet, get_feature_set


class FeaturesSettings(ServiceSettings):
    feature_set: str = Field(
        "all-v1",
        description="Feature set id published on features.v1 (libs/indicators/feature_sets.py), e.g. "
        "all-v1, lstm-35-v1, bilstm-13-v1, chart-analysis-v1.",
    )
    checkpoint_every_s: float = Field(
        60.0,
        gt=0,
        description="Seconds between indicator-state snapshots in Redis (and one at shutdown); a restart "
        "restores the snapshot and replays the acknowledged candles after it.",
    )
    warmup_source: str = Field(
        "archive",
        description="Where a (symbol, interval) without state warms up from, on its first candle: 'archive' "
        "(the klines Parquet archive), 'stream' (its earlier candles on klines.v1), or 'none' (warm up live).",
    )
    archive_url: str = Field(
        "", description="Parquet archive root (folder or fsspec URL), shared with ingest; default <data_dir>/archive."
    )
    warmup_candles: int = Field(
        0,
        ge=0,
        description="History candles fed per key at warm-up; 0 (the default) feeds all of it. Cumulative "
        "indicators (OBV, VPT) and EMA seeds depend on where the series starts, so serving equals the "
        "batch computation a model was trained on only when both start at the archive's first candle.",
    )
    gap_policy: str = Field(
        "continue",
        description="'continue': compute across missing candles, as batch does; 'reset': restart the key's "
        "warm-up after a gap.",
    )

    @field_validator("feature_set")
    @classmethod
    def _known_set(cls, v: str) -> str:
        try:
            return get_feature_set(v).id
        except UnknownFeatureSet as exc:
            raise ValueError(str(exc)) from None

    @field_validator("warmup_source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v not in {"archive", "stream", "none"}:
            raise ValueError(f"must be archive, stream or none, got {v!r}")
        return v

    @field_validator("gap_policy")
    @classmethod
    def _gap(cls, v: str) -> str:
        if v not in {"continue", "reset"}:
            raise ValueError(f"must be continue or reset, got {v!r}")
        return v

