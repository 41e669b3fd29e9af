"""The chat backends on a real model: llama-cpp-python in process, and its own
OpenAI-compatible server in a subprocess on loopback, both on the tiny Qwen2.5-VL pair."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from PIL import Image

from libs.llm.grammar import schema_to_gbnf, validate
from libs.llm.models import from_paths
from libs.llm.runtime import (
    BackendUnavailable,
    CallTimeout,
    InputError,
    LocalModel,
    RemoteModel,
    gpu_offload_supported,
    image_message,
)
from libs.llm.testing import ModelServer, free_port

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["signal", "why"],
    "properties": {"signal": {"enum": ["buy", "sell", "hold"]}, "why": {"type": "string", "maxLength": 30}},
}
GRAMMAR = schema_to_gbnf(SCHEMA)


def png(w: int = 300, h: int = 200) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (30, 160, 90)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def local(tiny_pair):
    model = LocalModel(from_paths(tiny_pair.model, tiny_pair.mmproj), n_ctx=2048, n_threads=1, image_max_tokens=64, warmup=False)
    model.load()
    yield model
    asyncio.run(model.close())


def test_local_model_answers_an_image_with_grammar_json(local):
    async def go():
        return await local.chat([image_message("Read the chart.", png())], grammar=GRAMMAR, max_tokens=80, timeout_s=60)

    answer = asyncio.run(go())
    validate(json.loads(answer.text, strict=True), SCHEMA)
    assert answer.finish_reason == "stop"
    assert set(answer.timings_ms) == {"image_encode", "prompt", "generation", "total"}
    assert answer.timings_ms["image_encode"] > 0  # the vision encoder really ran
    assert answer.prompt_tokens and answer.prompt_tokens > 16  # image tokens are in the prompt


def test_calls_run_one_at_a_time(local):
    async def go():
        msgs = [image_message("Read the chart.", png())]
        return await asyncio.gather(*(local.chat(msgs, grammar=GRAMMAR, max_tokens=80, timeout_s=60) for _ in range(3)))

    answers = asyncio.run(go())
    assert all(validate(json.loads(a.text), SCHEMA) is None for a in answers)


def test_a_timeout_stops_the_call_and_the_model_keeps_serving(local):
    async def go():
        msgs = [image_message("Read the chart.", png())]
        with pytest.raises(CallTimeout, match="longer than"):
            await local.chat(msgs, grammar=GRAMMAR, max_tokens=80, timeout_s=0.001)
        return await local.chat(msgs, grammar=GRAMMAR, max_tokens=80, timeout_s=60)

    validate(json.loads(asyncio.run(go()).text), SCHEMA)


def test_an_unreadable_image_is_an_input_error(local):
    async def go():
        await local.chat([image_message("x", b"not an image at all")], grammar=GRAMMAR, max_tokens=20, timeout_s=60)

    with pytest.raises(InputError):
        asyncio.run(go())


def test_a_broken_mmproj_fails_to_load_in_one_line(tiny_pair, tmp_path):
    broken = tmp_path / "mmproj-broken.gguf"
    broken.write_bytes(tiny_pair.mmproj.read_bytes()[:4096])  # GGUF magic, truncated body
    model = LocalModel(from_paths(tiny_pair.model, broken), n_ctx=1024, n_threads=1, warmup=False)
    with pytest.raises(BackendUnavailable) as err:
        model.load()
    assert "\n" not in str(err.value) and not model.loaded


@pytest.fixture(scope="module")
def server(tiny_pair):
    pytest.importorskip("uvicorn", reason="the vlm-server extra (llama-cpp-python's server) is not installed")
    with ModelServer(tiny_pair) as s:
        yield s


def test_remote_model_against_llama_cpp_server(server, tiny_pair):
    async def go():
        remote = RemoteModel(server.url + "/v1")
        try:
            served = await remote.describe()
            answer = await remote.chat([image_message("Read the chart.", png())], grammar=GRAMMAR, max_tokens=80, timeout_s=60)
        finally:
            await remote.close()
        return remote, served, answer

    remote, served, answer = asyncio.run(go())
    assert served.endswith(tiny_pair.model.name) and remote.model_name == tiny_pair.model.name
    validate(json.loads(answer.text, strict=True), SCHEMA)
    assert answer.prompt_tokens and answer.prompt_tokens > 16


def test_remote_server_down_is_backend_unavailable():
    async def go():
        remote = RemoteModel(f"http://127.0.0.1:{free_port()}")
        try:
            await remote.chat([image_message("x", None)], grammar=GRAMMAR, max_tokens=20, timeout_s=5)
        finally:
            await remote.close()

    with pytest.raises(BackendUnavailable, match="unreachable"):
        asyncio.run(go())


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_offload_supported(), reason="llama.cpp built without GPU offload (no CUDA here)")
def test_gpu_offload_answers(tiny_pair):
    model = LocalModel(from_paths(tiny_pair.model, tiny_pair.mmproj), n_ctx=2048, warmup=False)
    model.load()
    try:
        assert model.gpu_layers != 0
        answer = asyncio.run(model.chat([image_message("Read the chart.", png())], grammar=GRAMMAR, max_tokens=80, timeout_s=60))
        validate(json.loads(answer.text), SCHEMA)
    finally:
        asyncio.run(model.close())


def test_an_f16_pair_with_a_wide_vocabulary_loads_and_answers(tmp_path):
    """The writer's path for 7B-shaped speed checks (f16 weights, padded vocabulary), small."""
    from libs.llm.testing import TinyShape, write_tiny_qwen25vl

    shape = TinyShape(hidden=128, ffn=256, vision_hidden=64, vision_heads=4, vision_ffn=128, vocab_pad=3000, f16=True)
    pair = write_tiny_qwen25vl(tmp_path, shape)
    model = LocalModel(from_paths(pair.model, pair.mmproj), n_ctx=1024, n_threads=1, image_max_tokens=16, warmup=False)
    model.load()
    try:
        answer = asyncio.run(model.chat([image_message("x", png(112, 112))], grammar=GRAMMAR, max_tokens=80, timeout_s=60))
    finally:
        asyncio.run(model.close())
    validate(json.loads(answer.text), SCHEMA)
