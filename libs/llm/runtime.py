"""Chat backends: a GGUF model in this process (llama-cpp-python) or an OpenAI-compatible
server (llama-cpp-python's or llama.cpp's), behind one ``chat`` call.

Both take one call at a time per process (a ``Llama`` is not thread-safe, and a model server
pod is sized for the calls it gets: queueing belongs to the caller, who can then drop stale
work), give each call a deadline, and constrain the answer with a GBNF grammar.

Errors are one line and say what to do about them: ``CallTimeout`` (the call ran past its
deadline), ``BackendUnavailable`` (the model is not loaded or the server is down: try later),
``InputError`` (this request cannot be answered: an unreadable image, a prompt over the
context), ``LLMError`` (anything else the backend reported).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from libs.llm.models import ModelFiles

log = logging.getLogger("klinebus.llm")
Messages = list[dict[str, Any]]


class LLMError(RuntimeError):
    """A model call failed; ``str(exc)`` is one line."""


class CallTimeout(LLMError):
    """The call ran past its deadline (generation is stopped at the next token)."""


class BackendUnavailable(LLMError):
    """The model is not loaded or the server cannot be reached; the same request may succeed later."""


class InputError(LLMError):
    """This request cannot be answered (unreadable image, prompt longer than the context)."""


@dataclass
class ChatAnswer:
    text: str
    finish_reason: str | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ChatBackend(Protocol):
    kind: str
    model_name: str
    revision: str

    async def chat(
        self, messages: Messages, *, grammar: str, max_tokens: int, timeout_s: float,
        temperature: float = 0.0, seed: int | None = None,
    ) -> ChatAnswer: ...

    async def close(self) -> None: ...


def image_data_url(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode()}"


def image_message(text: str, png: bytes | None) -> dict[str, Any]:
    """An OpenAI-style user message: the image (if any) first, then the text."""
    content: list[dict[str, Any]] = []
    if png is not None:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(png)}})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class _TimedMtmd:
    """Stands in for the chat handler's ``mtmd_cpp`` module: sets the vision context's limits
    (image token bounds, warm-up, GPU) and times the image chunk (vision encoder + its
    embeddings decoded into the context), which the handler does not report on its own."""

    def __init__(self, module: Any, *, image_min_tokens: int, image_max_tokens: int, warmup: bool, use_gpu: bool) -> None:
        self._module = module
        self._limits = (image_min_tokens, image_max_tokens, warmup, use_gpu)
        self.image_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def mtmd_context_params_default(self) -> Any:
        params = self._module.mtmd_context_params_default()
        lo, hi, warmup, use_gpu = self._limits
        if lo > 0:
            params.image_min_tokens = lo
        if hi > 0:
            params.image_max_tokens = hi
        params.warmup = warmup
        params.use_gpu = use_gpu
        return params

    def mtmd_helper_eval_chunk_single(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._module.mtmd_helper_eval_chunk_single(*args)
        finally:
            self.image_s += time.perf_counter() - started


def _quiet_mtmd() -> None:
    """Send mtmd's own log (a dozen lines per image) through llama-cpp-python's log callback,
    which prints only errors unless the model is verbose, as llama.cpp's log already is."""
    import ctypes

    from llama_cpp import _logger, mtmd_cpp

    for setter in (mtmd_cpp.mtmd_log_set, mtmd_cpp.mtmd_helper_log_set):
        setter(_logger.llama_log_callback, ctypes.c_void_p(0))


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


class LocalModel:
    """A GGUF model (and, for vision, its mmproj) loaded in this process."""

    kind = "local"

    def __init__(
        self,
        files: ModelFiles,
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        n_batch: int = 512,
        image_min_tokens: int = 0,
        image_max_tokens: int = 0,
        warmup: bool = True,
        verbose: bool = False,
    ) -> None:
        self.files = files
        self.model_name = files.model_name
        self.revision = files.revision
        self._params = dict(n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, verbose=verbose)
        self._n_gpu_layers = n_gpu_layers
        self._vision = dict(image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens, warmup=warmup)
        self._llama: Any = None
        self._mtmd: _TimedMtmd | None = None
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()  # the Llama object itself: never two threads in it
        self.gpu_layers = 0

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    def load(self) -> None:
        """Load the model (blocking: seconds to minutes). Raises ``BackendUnavailable`` in one line."""
        import llama_cpp

        gpu = gpu_offload_supported()
        self.gpu_layers = self._n_gpu_layers if gpu else 0
        handler = None
        try:
            if self.files.mmproj is not None:
                from llama_cpp.llama_chat_format import Qwen25VLChatHandler

                _quiet_mtmd()
                handler = Qwen25VLChatHandler(clip_model_path=str(self.files.mmproj), verbose=self._params["verbose"])
                self._mtmd = _TimedMtmd(handler._mtmd_cpp, use_gpu=gpu, **self._vision)
                handler._mtmd_cpp = self._mtmd
            llama = llama_cpp.Llama(
                model_path=str(self.files.model), chat_handler=handler, n_gpu_layers=self.gpu_layers, **self._params
            )
            if handler is not None:
                handler._init_mtmd_context(llama)  # load the projector now, not on the first chart
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendUnavailable(f"loading {self.files.model.name}: {' '.join(str(exc).split())[:200]}") from None
        self._llama = llama
        log.info("loaded %s (mmproj %s, %d GPU layers)", self.files.model, self.files.mmproj, self.gpu_layers)

    def _complete(
        self, messages: Messages, grammar: str, max_tokens: int, temperature: float, seed: int | None,
        deadline: float, cancel: threading.Event,
    ) -> ChatAnswer:
        import llama_cpp

        first: list[float] = []
        stopped: list[bool] = []

        def stop(_ids: Any, _logits: Any) -> bool:
            # checked in Python after every sampled token: marks the prompt's end, enforces the
            # deadline (an exception cannot be raised from the sampler's C callback)
            now = time.perf_counter()
            if not first:
                first.append(now)
            if cancel.is_set() or now > deadline:
                stopped.append(True)
                return True
            return False

        def create_completion(**kwargs: Any) -> Any:
            # text models' chat formatters pass their own stopping criteria: keep them, add ours
            given = kwargs.pop("stopping_criteria", None) or []
            return original(**kwargs, stopping_criteria=llama_cpp.StoppingCriteriaList([stop, *given]))

        with self._thread_lock:
            if self._mtmd is not None:
                self._mtmd.image_s = 0.0
            started = time.perf_counter()
            # the chat handler does not pass stopping criteria on; its call to this Llama's
            # create_completion gets them here
            original = self._llama.create_completion
            self._llama.create_completion = create_completion
            try:
                out = self._llama.create_chat_completion(
                    messages=messages,
                    grammar=llama_cpp.LlamaGrammar.from_string(grammar, verbose=False),
                    max_tokens=max_tokens,
                    temperature=temperature,
                    seed=seed,
                )
            except ValueError as exc:
                raise InputError(" ".join(str(exc).split())[:200]) from None
            finally:
                del self._llama.create_completion  # back to the class's method
            if stopped:
                raise CallTimeout("generation stopped at the deadline")
            ended = time.perf_counter()
        image_s = self._mtmd.image_s if self._mtmd is not None else 0.0
        prompt_end = first[0] if first else ended
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return ChatAnswer(
            text=choice["message"]["content"] or "",
            finish_reason=choice.get("finish_reason"),
            timings_ms={
                "image_encode": _ms(image_s),
                "prompt": _ms(max(prompt_end - started - image_s, 0.0)),
                "generation": _ms(ended - prompt_end),
                "total": _ms(ended - started),
            },
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )

    async def chat(
        self, messages: Messages, *, grammar: str, max_tokens: int, timeout_s: float,
        temperature: float = 0.0, seed: int | None = None,
    ) -> ChatAnswer:
        if self._llama is None:
            raise BackendUnavailable(f"model {self.model_name} is not loaded")
        async with self._lock:
            cancel = threading.Event()
            deadline = time.perf_counter() + timeout_s
            job = asyncio.ensure_future(
                asyncio.to_thread(self._complete, messages, grammar, max_tokens, temperature, seed, deadline, cancel)
            )
            try:
                return await asyncio.wait_for(asyncio.shield(job), timeout_s)
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                cancel.set()
                # the lock is held until the thread is out of the model: the next call must not
                # enter a Llama that is still generating (it stops at its next token)
                with contextlib.suppress(Exception):
                    await job
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise CallTimeout(f"model call took longer than {timeout_s:.3g}s") from None

    async def close(self) -> None:
        if self._llama is not None:
            async with self._lock:
                llama, self._llama = self._llama, None
                await asyncio.to_thread(llama.close)


class RemoteModel:
    """An OpenAI-compatible chat-completions server that accepts a GBNF ``grammar`` field
    (llama-cpp-python's ``python -m llama_cpp.server``, llama.cpp's ``llama-server``)."""

    kind = "remote"

    def __init__(self, base_url: str, model: str = "", *, api_key: str | None = None, revision: str = "remote") -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model_name = model
        self.revision = revision
        self._api_key = api_key
        self._lock = asyncio.Lock()
        self._session: Any = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers())
        return self._session

    async def describe(self, timeout_s: float = 10.0) -> str:
        """Ask the server which model it serves (``GET /v1/models``); remembers it as ``model_name``."""
        import aiohttp

        session = await self._client()
        try:
            async with asyncio.timeout(timeout_s):
                async with session.get(f"{self.base_url}/v1/models") as resp:
                    if resp.status != 200:
                        raise BackendUnavailable(f"{self.base_url}/v1/models answered HTTP {resp.status}")
                    body = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"model server {self.base_url} unreachable: {type(exc).__name__}: {exc}"[:200]) from None
        data = body.get("data") or [] if isinstance(body, dict) else []
        served = str(data[0].get("id", "")) if data and isinstance(data[0], dict) else ""
        if not self.model_name:
            self.model_name = served.rsplit("/", 1)[-1] or "remote"
        return served

    async def chat(
        self, messages: Messages, *, grammar: str, max_tokens: int, timeout_s: float,
        temperature: float = 0.0, seed: int | None = None,
    ) -> ChatAnswer:
        import aiohttp

        body: dict[str, Any] = {
            "model": self.model_name or "default",
            "messages": messages,
            "grammar": grammar,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": False,
        }
        if seed is not None:
            body["seed"] = seed
        async with self._lock:
            session = await self._client()
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    async with session.post(f"{self.base_url}/v1/chat/completions", json=body) as resp:
                        text = await resp.text()
                        status = resp.status
            except TimeoutError:
                raise CallTimeout(f"model server took longer than {timeout_s:.3g}s") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise BackendUnavailable(f"model server {self.base_url} unreachable: {type(exc).__name__}: {exc}"[:200]) from None
            ended = time.perf_counter()
        if status >= 500 or status in (408, 429):
            raise BackendUnavailable(f"model server answered HTTP {status}: {' '.join(text.split())[:160]}")
        if status != 200:
            raise InputError(f"model server refused the request, HTTP {status}: {' '.join(text.split())[:160]}")
        try:
            import json

            out = json.loads(text)
            choice = out["choices"][0]
            content = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(f"model server answer is not a chat completion: {' '.join(text.split())[:160]}") from None
        usage = out.get("usage") or {}
        timings = {"total": _ms(ended - started)}
        server = out.get("timings") or {}  # llama.cpp's server reports its own split
        if isinstance(server, dict):
            for ours, theirs in (("prompt", "prompt_ms"), ("generation", "predicted_ms")):
                if isinstance(server.get(theirs), (int, float)):
                    timings[ours] = round(float(server[theirs]), 3)
        return ChatAnswer(
            text=content,
            finish_reason=choice.get("finish_reason"),
            timings_ms=timings,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
