"""The backend a VlmSettings asks for (model files resolved, nothing loaded yet)."""

from __future__ import annotations

from libs.llm.models import ModelFiles, from_hub, from_paths
from libs.llm.runtime import LocalModel, RemoteModel
from services.vlm.settings import VlmSettings


def model_files(s: VlmSettings) -> ModelFiles:
    """Raises ``ModelFileError`` (one line) for a missing, unreadable or non-GGUF file."""
    if s.model_path:
        return from_paths(s.model_path, s.mmproj_path)
    return from_hub(
        s.hf_repo, s.hf_revision, s.hf_model_file, s.hf_mmproj_file,
        cache_dir=s.hf_cache_dir or None, local_files_only=not s.hf_download,
        token=s.hf_token.get_secret_value() if s.hf_token else None,
    )


def local_model(s: VlmSettings) -> LocalModel:
    return LocalModel(
        model_files(s),
        n_ctx=s.n_ctx,
        n_gpu_layers=s.n_gpu_layers,
        n_threads=s.n_threads or None,
        image_max_tokens=s.image_max_tokens,
        warmup=s.warmup,
    )


def remote_model(s: VlmSettings) -> RemoteModel:
    return RemoteModel(
        s.remote_url, s.remote_model,
        api_key=s.remote_api_key.get_secret_value() if s.remote_api_key else None,
        revision=s.remote_revision,
    )
