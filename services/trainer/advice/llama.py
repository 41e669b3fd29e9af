"""Any GGUF model (or an OpenAI-compatible server) behind ``AdviceModel``, through libs/llm.

libs/llm owns loading, the one-call-at-a-time lock and the per-call deadline; this module
only fixes the seed's decoding (temperature 0, the answer grammar, an answer-length bound)
and says what a failed call means for a scorecard: a timeout or a prompt the model cannot take
is that item's (wrong) answer, recorded with its reason; a backend that is down stops the run
(the journal keeps every answer so far, the next run resumes).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from libs.common.errors import CliError
from libs.llm.models import ModelFileError, from_paths
from libs.llm.runtime import BackendUnavailable, CallTimeout, InputError, LocalModel, RemoteModel
from services.trainer.advice import answer as A

DEFAULT_TIMEOUT_S = 120.0
# the 3-shot prompt is ~1k tokens with a real tokenizer (the seed ran num_ctx 1024 with 9-entry
# lists); a byte-level test vocabulary needs ~2.6k
DEFAULT_N_CTX = 4096
FINGERPRINT_SPAN = 8 << 20  # bytes hashed at each end of a model file


def file_fingerprint(path: Path) -> str:
    """Size plus sha256 of the first and last 8 MiB: tells model files apart in a second even
    for multi-GB files (a fine-tune changes every tensor, the quantisation changes the header)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(FINGERPRINT_SPAN))
        if size > FINGERPRINT_SPAN:
            fh.seek(max(size - FINGERPRINT_SPAN, FINGERPRINT_SPAN))
            digest.update(fh.read())
    return f"{size}:{digest.hexdigest()[:24]}"


def disable_cpu_repack() -> None:
    """Load models without llama.cpp's repacked CPU weight layouts ("extra buffer types").

    With llama-cpp-python 0.3.36 a K-quant model (gemma-3-270m Q4_K_M) dies with a segmentation
    fault on its first evaluation on an AVX-512/AMX host, inside those kernels; loaded without them
    it runs (slower). llama-cpp-python has no argument for it, so this sets the model-parameter
    default for the whole process (``use_extra_bufts = False``) before the model is loaded.
    """
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params
    if getattr(default, "klinebus_no_repack", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params.klinebus_no_repack = True
    low.llama_model_default_params = params


class LlamaAdviceModel:
    """Chat messages in, the grammar-constrained answer text out, one call at a time."""

    def __init__(self, backend: Any, name: str, fingerprint: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.backend = backend
        self.name = name
        self.fingerprint = fingerprint
        self.timeout_s = timeout_s
        self.grammar = A.grammar()
        # the grammar's longest answer, with room for tokenisers that split characters into bytes
        self.max_tokens = 2 * A.max_answer_chars()
        self._loop = asyncio.new_event_loop()

    @classmethod
    def local(
        cls, model: str | Path, *, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
        n_gpu_layers: int = -1, timeout_s: float = DEFAULT_TIMEOUT_S, cpu_repack: bool = True,
    ) -> "LlamaAdviceModel":
        if not cpu_repack:
            disable_cpu_repack()
        try:
            files = from_paths(model, None)
        except ModelFileError as exc:
            raise CliError(str(exc)) from None
        backend = LocalModel(files, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
        try:
            backend.load()
        except BackendUnavailable as exc:
            raise CliError(str(exc)) from None
        return cls(backend, files.model_name, file_fingerprint(files.model), timeout_s)

    @classmethod
    def remote(cls, base_url: str, model: str = "", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> "LlamaAdviceModel":
        backend = RemoteModel(base_url, model)
        self = cls(backend, model or "remote", "", timeout_s)
        try:
            served = self._loop.run_until_complete(backend.describe())
        except BackendUnavailable as exc:
            self.close()
            raise CliError(str(exc)) from None
        self.name = backend.model_name
        # a server names what it serves; that name is all we can know of its weights
        self.fingerprint = f"remote:{base_url}:{served}"
        return self

    def answer(self, messages: list[dict[str, str]]) -> str:
        try:
            out = self._loop.run_until_complete(
                self.backend.chat(messages, grammar=self.grammar, max_tokens=self.max_tokens,
                                  timeout_s=self.timeout_s, temperature=0.0, seed=0)
            )
        except (CallTimeout, InputError) as exc:
            return f"<no answer: {type(exc).__name__}: {exc}>"  # parsed as an invalid answer, reason kept
        except BackendUnavailable as exc:
            raise CliError(f"{exc} (answers so far are kept; run again to resume)") from None
        return out.text

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self.backend.close())
        finally:
            self._loop.close()
