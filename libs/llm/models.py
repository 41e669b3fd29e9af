"""Model files: local paths or a pinned Hugging Face revision, checked before llama.cpp sees them.

llama.cpp reports a missing or truncated file as a crash or a long log; here each problem is
one line (``ModelFileError``) naming the file and what is wrong with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# The production model (the design card): Qwen2.5-VL-7B-Instruct converted by ggml-org.
DEFAULT_HF_REPO = "ggml-org/Qwen2.5-VL-7B-Instruct-GGUF"
DEFAULT_HF_MODEL_FILE = "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf"
DEFAULT_HF_MMPROJ_FILE = "mmproj-Qwen2.5-VL-7B-Instruct-f16.gguf"


class ModelFileError(RuntimeError):
    """A model file is missing, unreadable or not GGUF; the message is one line."""


@dataclass(frozen=True)
class ModelFiles:
    """Resolved local files plus what to report about them (file names and revision)."""

    model: Path
    mmproj: Path | None
    revision: str = "local"
    source: str = "path"

    @property
    def model_name(self) -> str:
        return self.model.name


def check_gguf(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelFileError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ModelFileError(f"{what} {path} is not a file")
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelFileError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if head != GGUF_MAGIC:
        raise ModelFileError(f"{what} {path} is not a GGUF file (starts with {head!r}, wants {GGUF_MAGIC!r})")
    return path


def from_paths(model: str | Path, mmproj: str | Path | None) -> ModelFiles:
    m = check_gguf(Path(model).expanduser(), "model file")
    p = check_gguf(Path(mmproj).expanduser(), "mmproj file") if mmproj else None
    return ModelFiles(m, p, revision="local", source="path")


def from_hub(
    repo_id: str,
    revision: str,
    model_file: str,
    mmproj_file: str | None,
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> ModelFiles:
    """Files of ``repo_id`` at a pinned commit (40 hex digits: a branch or tag can move under a
    running fleet). With ``local_files_only`` nothing is downloaded: the files must already be in
    ``cache_dir`` (a volume filled by an init job), which is how tests and air-gapped pods run."""
    if not COMMIT_SHA.match(revision or ""):
        raise ModelFileError(f"Hugging Face revision must be a full 40-hex commit id (pinned), got {revision!r}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def fetch(filename: str, what: str) -> Path:
        try:
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=str(cache_dir) if cache_dir else None,
                local_files_only=local_files_only,
                token=token,
            )
        except LocalEntryNotFoundError:
            raise ModelFileError(
                f"{what} {repo_id}/{filename}@{revision[:12]} is not in the local cache "
                f"{cache_dir or '(default)'} and downloads are off"
            ) from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise ModelFileError(f"{what} {repo_id}/{filename}@{revision[:12]}: {' '.join(str(exc).split())[:200]}") from None
        return check_gguf(Path(path), what)

    model = fetch(model_file, "model file")
    mmproj = fetch(mmproj_file, "mmproj file") if mmproj_file else None
    return ModelFiles(model, mmproj, revision=revision, source=f"hf:{repo_id}")
