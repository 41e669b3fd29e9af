from __future__ import annotations

from pydantic import Field

from libs.common.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    model_dir: str = Field(
        "",
        description="Local model registry folder; default <data_dir>/models. The persistence baseline "
        "(next close = last close) is written there as ONNX at start and served until trained models land.",
    )
