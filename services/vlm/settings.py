from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from libs.common.settings import ServiceSettings, parse_csv_list
from libs.llm.models import DEFAULT_HF_MMPROJ_FILE, DEFAULT_HF_MODEL_FILE, DEFAULT_HF_REPO


class VlmSettings(ServiceSettings):
    backend: Literal["local", "remote"] = Field(
        "local", description="local: the GGUF model in this process; remote: an OpenAI-compatible server."
    )
    # --- model files (local backend): paths, or a pinned Hugging Face revision -----------------
    model_path: str = Field("", description="GGUF text model file; empty: the Hugging Face files below.")
    mmproj_path: str = Field("", description="GGUF vision projector (mmproj) file beside model_path.")
    hf_repo: str = Field(DEFAULT_HF_REPO, description="Hugging Face repo of the GGUF pair.")
    hf_revision: str = Field("", description="Pinned 40-hex commit of hf_repo (a branch or tag can move).")
    hf_model_file: str = Field(DEFAULT_HF_MODEL_FILE, description="Text model file name in hf_repo.")
    hf_mmproj_file: str = Field(DEFAULT_HF_MMPROJ_FILE, description="mmproj file name in hf_repo.")
    hf_cache_dir: str = Field("", description="Hugging Face cache folder (a volume); empty: the hub default.")
    hf_download: bool = Field(False, description="Download missing files; off: only the cache is read (air-gapped pods).")
    hf_token: SecretStr | None = Field(None, description="Hugging Face token (private repos), from the environment only.")
    n_ctx: int = Field(4096, ge=512, description="Context tokens (image tokens + prompt + answer).")
    n_gpu_layers: int = Field(-1, ge=-1, description="Layers offloaded to the GPU when llama.cpp has one; -1: all.")
    n_threads: int = Field(0, ge=0, description="CPU threads for llama.cpp; 0: its default.")
    image_max_tokens: int = Field(512, ge=0, description="Cap on image tokens per chart (0: the model's own limit).")
    warmup: bool = Field(
        False,
        description="Reserve the vision encoder's buffers at load. llama.cpp sizes that warm-up for its largest "
        "image (46x46 patches), not for image_max_tokens: on a 7B that over-allocates by far, so it is off.",
    )
    # --- remote backend -------------------------------------------------------------------------
    remote_url: str = Field("", description="Base URL of the model server, e.g. http://vlm-model:8000.")
    remote_model: str = Field("", description="Model name sent to the server; empty: what GET /v1/models says.")
    remote_api_key: SecretStr | None = Field(None, description="Bearer token for the model server.")
    remote_revision: str = Field("remote", description="Revision reported on analyses.v1 for the served model.")
    presets: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["analysis"],
        description="Chart presets analysed (comma-separated); charts of others (classifier224 thumbnails) are skipped.",
    )
    # --- the call ---------------------------------------------------------------------------------
    image_max_side: int = Field(672, ge=56, le=4096, description="Charts are downscaled so no side exceeds this (px).")
    call_timeout_s: float = Field(180.0, gt=0, description="Deadline of one model call (a 7B on 2 CPU cores: 1-2 min).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature (0: greedy).")
    seed: int = Field(0, description="Sampling seed.")
    summary_max_chars: int = Field(240, ge=16, le=2000, description="Longest summary the grammar admits.")
    backend_attempts: int = Field(3, ge=1, description="Tries of a chart while the backend is down before its dead letter.")
    model_retry_s: float = Field(30.0, gt=0, description="Seconds between attempts to load a model that failed to load.")
    # --- scoring -----------------------------------------------------------------------------------
    score_horizon: int = Field(1, ge=1, le=500, description="Candles after the chart at which its call is scored.")
    score_flat_bps: float = Field(5.0, ge=0, description="A move smaller than this (basis points) counts as flat (hold/sideways).")
    score_window: int = Field(100, ge=1, description="Scored analyses in each rolling hit rate.")
    score_poll_s: float = Field(5.0, gt=0, description="Seconds between looks for candles that settle pending scores.")

    @field_validator("presets", mode="before")
    @classmethod
    def _presets(cls, v: object) -> object:
        return parse_csv_list(v)

    @model_validator(mode="after")
    def _paths_in_pairs(self) -> "VlmSettings":
        if self.model_path and not self.mmproj_path:
            raise ValueError("model_path needs mmproj_path too (the vision projector)")
        return self

    def backend_problem(self) -> str | None:
        """What is missing to reach a model (checked when the service starts, so the app can
        still be built without a model for the AsyncAPI document)."""
        if self.backend == "remote" and not self.remote_url:
            return "KLINEBUS_BACKEND=remote needs KLINEBUS_REMOTE_URL"
        if self.backend == "local" and not self.model_path and not self.hf_revision:
            return (
                "KLINEBUS_BACKEND=local needs KLINEBUS_MODEL_PATH + KLINEBUS_MMPROJ_PATH, or "
                "KLINEBUS_HF_REVISION (a pinned commit of KLINEBUS_HF_REPO)"
            )
        return None
