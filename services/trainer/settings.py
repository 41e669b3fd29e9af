from __future__ import annotations

from pydantic import Field, field_validator

from libs.common.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    archive_url: str = Field(
        "", description="Parquet klines archive root datasets are built from (folder or fsspec URL); "
        "default <data_dir>/archive."
    )
    registry_url: str = Field(
        "", description="Model registry: a folder or any fsspec URL holding <model-name>/<version>/; "
        "default <data_dir>/registry."
    )
    work_dir: str = Field(
        "", description="Where datasets are built for bus requests (one folder per request id); "
        "default <data_dir>/trainer."
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    torch_threads: int = Field(1, ge=0, description="CPU threads per training job; 0: torch's default (every core).")
    max_epochs: int = Field(0, ge=0, description="Caps every job's epochs; 0 keeps each seed's own (100, 150).")
    max_batches_per_epoch: int = Field(0, ge=0, description="Caps batches per epoch (smoke runs, demos); 0: all.")
    seed: int = Field(0, description="Seed of weights, batch order and sampling; the same seed trains the same model.")
    walk_forward_folds: int = Field(3, ge=1, description="Consecutive folds the test slice is scored in.")
    hf_repo_id: str = Field(
        "", description="Hugging Face Hub repository to publish to as well, e.g. my-org/{model} ({model}: "
        "the package name, one repository per model); empty: the registry only."
    )
    hf_token: str = Field("", description="Hub token with write access (secret: from the environment only).")
    hf_endpoint: str = Field("", description="Another Hub endpoint (a mirror); empty: huggingface.co.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    def archive_root(self) -> str:
        return self.archive_url or str(self.data_dir / "archive")

    def registry_root(self) -> str:
        return self.registry_url or str(self.data_dir / "registry")

    def work_root(self) -> str:
        return self.work_dir or str(self.data_dir / "trainer")
