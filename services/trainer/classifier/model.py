"""The fused model: ViT patch tokens, BERT's [CLS] attending over them, two heads.

::

    text  -> BERT -> [CLS] (B, 1, d_text) ----------- query
    chart -> ViT  -> patch tokens (B, 196, d_vision) -- keys / values
             8-head cross-attention -> residual + LayerNorm -> h (B, d_text)
             h -> classifier (3 logits: bearish / neutral / bullish)
             h -> forecaster (next close as a scaled return, see labels.py)

The chart goes in as the PNG's pixels, ``uint8`` (B, 224, 224, 3); scaling to the vision
model's mean/std happens inside the model, so the exported ONNX graph takes decoded pixels and
serving cannot normalise differently from training. Encoders come from ``transformers`` by Hub
name (``google/vit-base-patch16-224``, ``bert-base-uncased``) or a local folder, or from a config
dict (random weights: the tests' tiny models).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.trainer.classifier.labels import CLASS_NAMES

DEFAULT_VISION = "google/vit-base-patch16-224"
DEFAULT_TEXT = "bert-base-uncased"
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


def _load(spec: str | dict, what: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    try:
        if isinstance(spec, dict):
            cfg = dict(spec)
            model_type = cfg.pop("model_type")
            return AutoModel.from_config(AutoConfig.for_model(model_type, **cfg), add_pooling_layer=False)
        return AutoModel.from_pretrained(spec, add_pooling_layer=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the {what} encoder {spec if isinstance(spec, str) else '(config)'}: {first}") from None


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
        self.image_size = int(getattr(vision.config, "image_size", 224))
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
    vision = _load(config.vision, "vision")
    text = _load(config.text, "text")
    model = ChartTextFusion(vision, text, config)
    if model.image_size != 224:
        raise ModelError(f"the vision encoder takes {model.image_size} px images; the classifier's charts are 224 px")
    return model


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
