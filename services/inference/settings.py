from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from libs.common.settings import ServiceSettings, parse_csv_list


class InferenceSettings(ServiceSettings):
    model_dir: str = Field(
        "",
        description="Local model registry folder (<model_dir>/<name>/<version>/); default <data_dir>/models. "
        "The newest promoted version of each model there is served at start, then models.v1 decides "
        "(the last announcement of a name wins, so publishing an older version rolls back). The persistence "
        "baseline (next close = last close) is written there as ONNX and always served.",
    )
    model_cache_dir: str = Field(
        "", description="Where packages announced with a remote uri (fsspec URL, hf://) are fetched; "
        "default <model_dir>/.cache."
    )
    model_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Where models announced on models.v1 may be loaded from, comma-separated: local folders, "
        "fsspec URLs (s3://bucket/models) and Hugging Face owners or repos (hf://my-org); an announcement "
        "naming anything else is refused (dead letter). Empty: the local registry (model_dir) only.",
    )
    max_batch: int = Field(
        64, ge=1, description="Most windows one model runs in one session call (64 was the fastest per window "
        "for the seed BiLSTM here: larger batches leave the CPU caches)."
    )
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a model waits for more windows after the first before it runs."
    )
    session_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads per model.")
    session_calls: int = Field(
        2, ge=1, le=64, description="Session calls of one forecasting model that run at once, each in its own thread "
        "(forecasts are still published in order). Calls x session_threads should not exceed the pod's cores: "
        "2 x 1 answered a 1,000-symbol burst of the seed BiLSTM ~1.4x sooner than 1 x 1 on 2 cores "
        "(docs/inference.md). Chart classifiers make one call at a time.",
    )
    model_variant: Literal["auto", "float"] = Field(
        "auto", description="auto: serve a package's int8 variant when its trainer left one (checked against the "
        "float graph at export; ~1.8x faster per session call); float: always the float graph (forecasts that do "
        "not depend on their batch mates, docs/inference.md).")
    score_window: int = Field(100, ge=1, description="Scores in each rolling MAE / hit rate (per model, symbol, interval, horizon).")
    behind_min_samples: int = Field(30, ge=1, description="Scores needed before a model can be marked behind persistence.")
    behind_ratio: float = Field(
        1.0, gt=0, description="A model is behind when its rolling MAE exceeds persistence's times this."
    )
    demote_behind: bool = Field(
        False, description="Publish a model that is behind persistence with role=shadow (still scored) instead of primary."
    )
    serve_unpromoted: bool = Field(
        False, description="Also serve packages that did not beat their baselines, as role=shadow (scored, "
        "never the primary answer): a candidate watched live before anyone relies on it."
    )
    alert_rules: str = Field(
        "", description="YAML file of market alert rules (docs/inference.md); empty: no market alerts."
    )
    restore_scan_entries: int = Field(
        200_000, ge=0, description="Most entries read back per topic at start to rebuild windows, scores and "
        "alert state (features.v1, predictions.v1, scores.v1, alerts.v1)."
    )
    archive_url: str = Field(
        "", description="Klines Parquet archive root (folder or fsspec URL), shared with ingest and features; "
        "default <data_dir>/archive. A stream whose features.v1 history is shorter than its models' lookback "
        "gets its window's older rows computed from it (the shared indicator library, from the archive's "
        "first candle), so a first deployment forecasts from its first live candle.",
    )
    drain_timeout_s: float = Field(10.0, ge=0, description="At stop, how long queued forecasts may take to publish.")

    @field_validator("model_sources", mode="before")
    @classmethod
    def _sources(cls, v: object) -> object:
        return parse_csv_list(v)

    @field_validator("alert_rules")
    @classmethod
    def _rules_file(cls, v: str) -> str:
        if v:
            from services.inference.alert_rules import RulesError, load_rules

            try:
                load_rules(v)
            except RulesError as exc:
                raise ValueError(str(exc)) from None
        return v
