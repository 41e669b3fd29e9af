from __future__ import annotations

from pydantic import Field

from libs.common.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    models: str = Field(
        "persistence",
        description="Comma-separated models to serve. 'persistence' (the naive baseline: next close = "
        "last close) is always available and is what the skeleton serves until trained models land.",
    )
    model_dir: str = Field("", description="Local model registry folder; default <data_dir>/models.")
