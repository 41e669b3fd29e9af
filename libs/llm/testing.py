"""Tiny random-weight Qwen2.5-VL-shaped GGUF pairs, written with the ``gguf`` package.

Tests and the demo need a model that llama-cpp-python really loads and runs (text model
plus vision projector), without downloading gigabytes: ``write_tiny_qwen25vl`` writes a
``qwen2vl`` text model with a byte-level BPE vocabulary (the 256 GPT-2 byte symbols, a few
merges, the Qwen chat special tokens) and an mmproj with ``clip.projector_type =
qwen2.5vl_merger``, tensor and key names as llama.cpp's loaders expect. Its weights are
random, so its answers are gibberish: it proves the path (load, image in, grammar, parse),
never quality. ``hidden``/``layers`` can be raised to write a 7B-shaped model for speed
measurements on a GPU (random weights measure speed honestly; quality needs real weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Qwen2-VL's chat template (the one its tokenizer_config.json ships); metadata for tools
# that read it, the chat handler renders Qwen's format itself.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# A few merges so the BPE tokenizer has some (llama.cpp refuses a BPE vocabulary without any).
MERGES = ("Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r")
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable symbol map (byte-level BPE), as the 256 base tokens in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


@dataclass(frozen=True)
class TinyPair:
    model: Path
    mmproj: Path


@dataclass(frozen=True)
class TinyShape:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    context: int = 4096
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_ffn: int = 64
    patch: int = 14
    vocab_pad: int = 0  # extra unused tokens: the 7B's output layer is 152064 tokens wide
    f16: bool = False  # half-precision weights (a 7B-shaped pair: ~16 GB instead of ~32 GB)


# Qwen2.5-VL-7B-Instruct's shape (its config.json), for speed measurements with random weights.
QWEN25VL_7B = TinyShape(
    hidden=3584, layers=28, heads=28, kv_heads=4, ffn=18944, context=8192,
    vision_hidden=1280, vision_layers=32, vision_heads=16, vision_ffn=3420, vocab_pad=152064 - 286, f16=True,
)


def _rand_any(rng: np.random.Generator, *shape: int, scale: float = 0.02, f16: bool = False) -> np.ndarray:
    out = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return out.astype(np.float16) if f16 and len(shape) > 1 else out


def write_tiny_qwen25vl(folder: str | Path, shape: TinyShape = TinyShape(), seed: int = 0, name: str = "tiny-qwen25vl") -> TinyPair:
    """Write ``<name>.gguf`` and ``mmproj-<name>.gguf`` into ``folder``; returns their paths."""
    import gguf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model_path = folder / f"{name}.gguf"
    mmproj_path = folder / f"mmproj-{name}.gguf"
    _write_text(gguf, model_path, shape, rng, name)
    _write_mmproj(gguf, mmproj_path, shape, rng, name)
    return TinyPair(model_path, mmproj_path)


def _write_text(gguf, path: Path, s: TinyShape, rng: np.random.Generator, name: str) -> None:
    tokens = byte_symbols() + ["".join(m.split(" ")) for m in MERGES] + list(SPECIAL_TOKENS)
    types = [TOKEN_NORMAL] * (len(tokens) - len(SPECIAL_TOKENS)) + [TOKEN_CONTROL] * len(SPECIAL_TOKENS)
    tokens += [f"<|unused_{i}|>" for i in range(s.vocab_pad)]
    types += [TOKEN_CONTROL] * s.vocab_pad

    def _rand(rng: np.random.Generator, *shape: int, scale: float = 0.02) -> np.ndarray:
        return _rand_any(rng, *shape, scale=scale, f16=s.f16)

    vocab = len(tokens)
    head_dim = s.hidden // s.heads
    w = gguf.GGUFWriter(str(path), "qwen2vl", use_temp_file=s.f16)  # a 7B shape spills to disk, not RAM
    w.add_name(name)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    # M-RoPE sections (temporal, height, width, unused) cover half the head dimension, as in the 7B
    quarter = head_dim // 8
    w.add_rope_dimension_sections([head_dim // 2 - 2 * quarter, quarter, quarter, 0])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if s.f16 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(MERGES))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(QWEN2VL_CHAT_TEMPLATE)
    kv_dim = head_dim * s.kv_heads
    w.add_tensor("token_embd.weight", _rand(rng, vocab, s.hidden, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(s.hidden, np.float32))
    w.add_tensor("output.weight", _rand(rng, vocab, s.hidden, scale=1.0))
    for i in range(s.layers):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", np.ones(s.hidden, np.float32))
        w.add_tensor(f"{b}.attn_q.weight", _rand(rng, s.hidden, s.hidden))
        w.add_tensor(f"{b}.attn_q.bias", _rand(rng, s.hidden))
        w.add_tensor(f"{b}.attn_k.weight", _rand(rng, kv_dim, s.hidden))
        w.add_tensor(f"{b}.attn_k.bias", _rand(rng, kv_dim))
        w.add_tensor(f"{b}.attn_v.weight", _rand(rng, kv_dim, s.hidden))
        w.add_tensor(f"{b}.attn_v.bias", _rand(rng, kv_dim))
        w.add_tensor(f"{b}.attn_output.weight", _rand(rng, s.hidden, s.hidden))
        w.add_tensor(f"{b}.ffn_norm.weight", np.ones(s.hidden, np.float32))
        w.add_tensor(f"{b}.ffn_gate.weight", _rand(rng, s.ffn, s.hidden))
        w.add_tensor(f"{b}.ffn_up.weight", _rand(rng, s.ffn, s.hidden))
        w.add_tensor(f"{b}.ffn_down.weight", _rand(rng, s.hidden, s.ffn))
    _finish(w)


def _write_mmproj(gguf, path: Path, s: TinyShape, rng: np.random.Generator, name: str) -> None:
    def _rand(rng: np.random.Generator, *shape: int, scale: float = 0.02) -> np.ndarray:
        return _rand_any(rng, *shape, scale=scale, f16=s.f16)

    v, ff, p = s.vision_hidden, s.vision_ffn, s.patch
    merged = v * 4  # the merger concatenates 2x2 neighbouring patches
    w = gguf.GGUFWriter(str(path), "clip", use_temp_file=s.f16)
    w.add_name(f"mmproj-{name}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if s.f16 else gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("qwen2.5vl_merger")
    w.add_vision_projection_dim(s.hidden)
    w.add_vision_patch_size(p)
    w.add_vision_image_size(560)
    w.add_vision_embedding_length(v)
    w.add_vision_feed_forward_length(ff)
    w.add_vision_block_count(s.vision_layers)
    w.add_vision_head_count(s.vision_heads)
    w.add_vision_attention_layernorm_eps(1e-6)
    w.add_vision_image_mean([0.48145466, 0.4578275, 0.40821073])
    w.add_vision_image_std([0.26862954, 0.26130258, 0.27577711])
    w.add_vision_use_silu(True)
    w.add_vision_n_wa_pattern(s.vision_layers)  # the last layer attends fully, the others by window
    w.add_vision_window_size(112)
    # two temporal slices of the 3D patch convolution (a still image goes through both)
    w.add_tensor("v.patch_embd.weight", _rand(rng, v, 3, p, p))
    w.add_tensor("v.patch_embd.weight.1", _rand(rng, v, 3, p, p))
    for i in range(s.vision_layers):
        b = f"v.blk.{i}"
        for proj in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(f"{b}.{proj}.weight", _rand(rng, v, v))
            w.add_tensor(f"{b}.{proj}.bias", _rand(rng, v))
        w.add_tensor(f"{b}.attn_out.weight", _rand(rng, v, v))
        w.add_tensor(f"{b}.attn_out.bias", _rand(rng, v))
        w.add_tensor(f"{b}.ln1.weight", np.ones(v, np.float32))
        w.add_tensor(f"{b}.ln2.weight", np.ones(v, np.float32))
        w.add_tensor(f"{b}.ffn_up.weight", _rand(rng, ff, v))
        w.add_tensor(f"{b}.ffn_up.bias", _rand(rng, ff))
        w.add_tensor(f"{b}.ffn_gate.weight", _rand(rng, ff, v))
        w.add_tensor(f"{b}.ffn_gate.bias", _rand(rng, ff))
        w.add_tensor(f"{b}.ffn_down.weight", _rand(rng, v, ff))
        w.add_tensor(f"{b}.ffn_down.bias", _rand(rng, v))
    w.add_tensor("v.post_ln.weight", np.ones(v, np.float32))
    w.add_tensor("mm.0.weight", _rand(rng, merged, merged))
    w.add_tensor("mm.0.bias", _rand(rng, merged))
    w.add_tensor("mm.2.weight", _rand(rng, s.hidden, merged))
    w.add_tensor("mm.2.bias", _rand(rng, s.hidden))
    _finish(w)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelServer:
    """llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) on loopback,
    serving a GGUF pair in a subprocess: the deployment's model pod, in miniature."""

    def __init__(self, pair: TinyPair, *, port: int | None = None, n_ctx: int = 2048, threads: int = 1) -> None:
        self.pair = pair
        self.port = port or free_port()
        self.n_ctx = n_ctx
        self.threads = threads
        self.proc = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "ModelServer":
        import subprocess
        import sys
        import time
        import urllib.request

        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server",
                "--model", str(self.pair.model), "--clip_model_path", str(self.pair.mmproj),
                "--chat_format", "qwen2.5-vl", "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer on {self.url} within {timeout_s:.0f}s")

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
