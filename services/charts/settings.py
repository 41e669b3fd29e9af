from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from libs.common.settings import ServiceSettings, parse_csv_list


class ChartsSettings(ServiceSettings):
    cadence_s: float = Field(600.0, gt=0, description="Seconds between scheduled charts of each symbol/interval.")
    window: int = Field(60, ge=2, le=2000, description="Candles per chart (the analysis seed shows 60).")
    width_px: int = Field(1000, ge=64, le=8000, description="Chart width in pixels.")
    height_px: int = Field(750, ge=64, le=8000, description="Chart height in pixels.")
    preset: str = Field("analysis", description="Preset of scheduled charts: analysis or classifier224.")
    artifact_url: str = Field(
        "", description="Where PNGs go: any fsspec URL (s3://bucket/charts, ...); default <data_dir>/charts."
    )
    retention_s: float = Field(7 * 86400.0, gt=0, description="Charts older than this are deleted.")
    expire_every_s: float = Field(3600.0, gt=0, description="Seconds between retention sweeps.")
    render_workers: int = Field(1, ge=0, description="Render processes (0: render in the service process).")
    # NoDecode: the env value is 'A,B,C' (as k8s and compose set it for every service), parsed by
    # _symbols, not JSON-decoded first (which fails on a bare comma list).
    symbols: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Only chart these symbols (comma-separated); empty: every symbol seen on klines.v1.",
    )

    @field_validator("symbols", mode="before")
    @classmethod
    def _symbols(cls, v: object) -> object:
        v = parse_csv_list(v)
        if isinstance(v, list):
            return list(dict.fromkeys(str(s).strip().upper() for s in v if str(s).strip()))
        return v

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        if v not in ("analysis", "classifier224"):
            raise ValueError(f"must be analysis or classifier224, got {v!r}")
        return v

    def artifact_root(self) -> str:
        return self.artifact_url or str((self.data_dir / "charts").resolve())
