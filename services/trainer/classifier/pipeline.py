"""Train, judge, export and package a chart classifier from a dataset folder (``klinebus train``).

1. Load the index; fit the next-close scale and the majority class on the train split only.
2. Build the model (encoders by Hub name, local folder or config; by default the packaged MiniLM
   and a small random-init ViT, no network) and train it with the trainer's loop; model selection
   (early stopping) sees only the validation split.
3. Export ONNX and check it against torch with onnxruntime on real test samples.
4. Score validation and test with the exported graph (what serving runs) beside the baselines
   (scorecard.py); promote on validation.
5. Publish a package (libs/common/model_package.py) with the tokenizer folder and the model card.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from libs.common.klines import INTERVAL_MS
from libs.common.model_package import (
    ModelPackage,
    PublishedPackage,
    Ranges,
    Scaler,
    Served,
    TensorSpec,
    TimeRange,
    code_version,
)
from services.trainer.classifier.data import IMAGE_SIZE, MAX_TOKENS, ChartTextDataset
from services.trainer.classifier.dataset import KIND, load_index, load_manifest
from services.trainer.classifier.export import INPUTS, check_fusion, export_fusion, onnx_predict
from services.trainer.classifier.labels import CLASS_NAMES, return_scale
from services.trainer.classifier.model import (
    DEFAULT_TEXT,
    DEFAULT_VISION,
    FORECAST_LOSS_WEIGHT,
    MINILM_PACKAGE,
    FusionConfig,
    ModelError,
    build_fusion,
    from_pretrained,
    resolve_text,
    resolve_vision,
)
from services.trainer.classifier.scorecard import flat_metrics, promote, split_scorecard
from services.trainer.classifier.train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_PATIENCE,
    RANDOM_VISION_LR,
    CombinedLoss,
    Joined,
    batch_sources,
)
from services.trainer.loop import EpochLog, FitResult, LoopConfig, fit
from services.trainer.packaging import PublishTargets, model_card, stage_and_publish

EXPORT_CHECK_SAMPLES = 4
SECRET_OPTIONS = ("hub_token",)  # never written into a package
CHART_PRESET = "classifier224"


@dataclass
class ClassifierOptions:
    registry: str
    hub_repo_id: str | None = None  # publish to the Hugging Face Hub too (with hub_token)
    hub_token: str | None = None
    hub_endpoint: str | None = None
    # Hub name, local folder or config dict; the defaults are keywords that need no network:
    # "small-vit" (random-init ViT, model.small_vit) and "minilm" (the packaged pretrained MiniLM).
    vision: str | dict = DEFAULT_VISION
    text: str | dict = DEFAULT_TEXT
    tokenizer: str | None = None  # default: the text encoder's name or folder
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    # None: the seed's 2e-5 (fine-tuning) when the image encoder is pretrained, RANDOM_VISION_LR
    # when it starts from random weights (the default small ViT, a config dict).
    lr: float | None = None
    dropout: float = 0.1  # the fusion's attention and the classifier head
    image_size: int | None = None  # small-vit only: pool the 224 px chart to this size first
    patch_size: int | None = None  # small-vit only
    threads: int | None = None  # CPU threads (None: torch's setting)
    patience: int = DEFAULT_PATIENCE
    device: str = "auto"
    seed: int = 0
    max_batches: int | None = None  # per epoch (smoke runs, tests)
    max_tokens: int = MAX_TOKENS
    forecast_loss_weight: float = FORECAST_LOSS_WEIGHT
    # False freezes that encoder (only the fusion, the heads and the other encoder learn): a
    # pretrained text encoder reading one candle's numbers can stay frozen where compute is short.
    train_vision: bool = True
    train_text: bool = True
    name: str | None = None  # default: chart-classifier-<SYMBOL>-<interval>


@dataclass
class ClassifierResult:
    package: PublishedPackage
    hub: PublishedPackage | None
    promoted: bool
    reason: str
    scorecards: dict[str, dict]
    fit: FitResult
    export_check: dict
    extra: dict[str, Any] = field(default_factory=dict)


def load_tokenizer(name_or_path: str, what: str = "tokenizer"):
    """``what``: how the error names it ("text encoder" when the tokenizer is the encoder's own)."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer.from_pretrained, name_or_path, what)


def resolved_lr(opts: ClassifierOptions) -> float:
    if opts.lr is not None:
        return opts.lr
    return RANDOM_VISION_LR if opts.vision == DEFAULT_VISION or isinstance(opts.vision, dict) else DEFAULT_LR


def encoder_label(spec: str | dict, resolved: str | dict) -> str:
    """How the card and the config name an encoder."""
    if spec == DEFAULT_TEXT:
        return f"all-MiniLM-L6-v2 (pretrained, from the {MINILM_PACKAGE} package)"
    if isinstance(resolved, dict):
        shape = (f"hidden {resolved.get('hidden_size')}, {resolved.get('num_hidden_layers')} layers, "
                 f"{resolved.get('image_size')} px / {resolved.get('patch_size')} px patches" if resolved.get("model_type") == "vit"
                 else f"hidden {resolved.get('hidden_size')}, {resolved.get('num_hidden_layers')} layers")
        who = "small-vit: " if spec == DEFAULT_VISION else ""
        return f"{who}{resolved.get('model_type')} config, random init ({shape})"
    return str(spec)


def _collate(ds: ChartTextDataset, n: int) -> dict[str, torch.Tensor]:
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([it[k] for it in items]) for k in INPUTS}


def _range(part, step: int) -> TimeRange:
    return TimeRange(start=int(part["first_open_time"].min()), end=int(part["open_time"].max()) + step, rows=len(part))


def train_chart_classifier(
    dataset_dir: str | Path,
    opts: ClassifierOptions,
    on_epoch: Callable[[EpochLog], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_start: Callable[[dict], None] | None = None,
) -> ClassifierResult:
    root = Path(dataset_dir)
    index = load_index(root)
    manifest = load_manifest(root)
    parts = {s: index[index["split"] == s].reset_index(drop=True) for s in ("train", "validation", "test")}
    for s, p in parts.items():
        if len(p) == 0:
            raise ModelError(f"{root}: the {s} split is empty")
    symbol, interval = str(index["symbol"].iat[0]), str(index["interval"].iat[0])
    train = parts["train"]
    scale = return_scale(train["close"].to_numpy(np.float64), train["next_close"].to_numpy(np.float64))
    majority = int(np.bincount(train["label"].to_numpy(np.int64), minlength=len(CLASS_NAMES)).argmax())

    vision_spec = resolve_vision(opts.vision, opts.image_size, opts.patch_size)
    text_spec = resolve_text(opts.text)
    if opts.tokenizer:
        tokenizer = load_tokenizer(opts.tokenizer)
    elif isinstance(text_spec, str):
        tokenizer = load_tokenizer(text_spec, "text encoder")
    else:
        raise ModelError("a text encoder given as a config needs --tokenizer (a name or folder)")
    lr = resolved_lr(opts)
    fcfg = FusionConfig(vision=vision_spec, text=text_spec, dropout=opts.dropout,
                        forecast_loss_weight=opts.forecast_loss_weight)
    torch.manual_seed(opts.seed)  # the random-init encoder and heads: the same weights for the same seed
    model = build_fusion(fcfg)
    vocab = getattr(model.text.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens, the text encoder's vocabulary {vocab}")
    for encoder, trained in ((model.vision, opts.train_vision), (model.text, opts.train_text)):
        encoder.requires_grad_(trained)
    ds = {s: ChartTextDataset(root, p, tokenizer, scale, opts.max_tokens) for s, p in parts.items()}

    train_b, val_b = batch_sources(ds["train"], ds["validation"], opts.batch_size)
    if on_start is not None:
        batches = math.ceil(len(ds["train"]) / opts.batch_size)
        on_start({"kind": KIND, "samples": {s: len(d) for s, d in ds.items()}, "epochs": opts.epochs,
                  "batches": batches if opts.max_batches is None else min(batches, opts.max_batches)})
    loop = LoopConfig(
        epochs=opts.epochs, lr=lr, patience=opts.patience, seed=opts.seed, device=opts.device,
        max_batches=opts.max_batches, threads=opts.threads,
    )
    result = fit(
        Joined(model), train_b, val_b, CombinedLoss(opts.forecast_loss_weight), loop,
        on_epoch=on_epoch, on_batch=on_batch, should_stop=should_stop,
    )

    model.cpu().eval()
    sample = _collate(ds["test"], EXPORT_CHECK_SAMPLES)
    with tempfile.TemporaryDirectory(prefix="chart-classifier-") as tmp:
        tmp_path = Path(tmp)
        onnx_path = export_fusion(model, sample, tmp_path / "model.onnx")
        check = check_fusion(model, onnx_path, sample)
        # Scored with the exported graph, what serving runs (the trainer's rule).
        cards, matrices = {}, {}
        train_labels = train["label"].to_numpy(np.int64)
        for s in ("validation", "test"):
            probs, fc = onnx_predict(onnx_path, ds[s], opts.batch_size)
            p = parts[s]
            cards[s], matrices[s] = split_scorecard(
                p["label"].to_numpy(np.int64), p["last_label"].to_numpy(np.int64), train_labels,
                p["close"].to_numpy(np.float64), p["next_close"].to_numpy(np.float64), probs, fc, scale,
            )
        promoted, reason = promote(cards["validation"])
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        metrics, baselines = flat_metrics(cards)
        step = INTERVAL_MS[interval]
        config = {
            "model": {**fcfg.to_json(), "encoders": {
                "vision": _describe(model.vision, encoder_label(opts.vision, vision_spec)),
                "text": _describe(model.text, encoder_label(opts.text, text_spec))}},
            "training": {**{k: v for k, v in asdict(opts).items() if k not in SECRET_OPTIONS}, "lr": lr,
                         "loop": loop.as_dict(), "best_epoch": result.best_epoch,
                         "epochs_run": result.epochs_run, "stopped": result.stopped, "device": result.device,
                         "amp": result.amp, "history": [asdict(h) for h in result.history]},
            "input_topic": "charts.v1",
            "chart": {**manifest["renderer"], "preset": CHART_PRESET},
            "text": {**manifest["text"], "tokenizer": "tokenizer/", "max_tokens": opts.max_tokens, "padding": "max_length"},
            "labels": {**manifest["labels"], "neutral_atr_multiple": manifest["spec"]["neutral_atr_multiple"]},
            "next_close": "next_close = close * (1 + next_close_scaled * scalers.next_close.scale[0]), close = the chart's last close",
            "majority_class": CLASS_NAMES[majority],
            "confusion_matrices": matrices,
            "export_check": check,
            "dataset": {"class_counts": manifest["class_counts"], "sources": manifest["sources"],
                        "embargo_candles": manifest["embargo_candles"], "spec": manifest["spec"]},
        }
        meta = ModelPackage(
            name=opts.name or f"{KIND}-{symbol}-{interval}",
            version="1",  # the registry gives the next free one
            kind=KIND,
            inputs=[
                TensorSpec(name="image", dtype="uint8", shape=["batch", IMAGE_SIZE, IMAGE_SIZE, 3],
                           meaning=f"the {CHART_PRESET} chart PNG decoded to RGB pixels (0..255); scaled in the graph"),
                TensorSpec(name="input_ids", dtype="int64", shape=["batch", opts.max_tokens],
                           meaning="tokenizer/ ids of the last candle's text (config.text), padded to max_tokens"),
                TensorSpec(name="attention_mask", dtype="int64", shape=["batch", opts.max_tokens],
                           meaning="1 for real tokens, 0 for padding"),
            ],
            outputs=[
                TensorSpec(name="probabilities", dtype="float32", shape=["batch", 3], meaning="P(bearish), P(neutral), P(bullish)"),
                TensorSpec(name="next_close_scaled", dtype="float32", shape=["batch"],
                           meaning="(next_close / close - 1) / scalers.next_close.scale[0]"),
            ],
            feature_set=f"chart:{CHART_PRESET}",
            features=[],
            targets=["class", "close"],
            lookback=int(manifest["spec"]["window"]),
            horizons=[1],
            scalers={"next_close": Scaler(kind="standard", columns=["next_return"], center=[0.0], scale=[scale])},
            input_scaling="in-graph",
            serves=[Served(symbol=symbol, interval=interval)],
            ranges=Ranges(
                train=_range(parts["train"], step), validation=_range(parts["validation"], step),
                test=_range(parts["test"], step), embargo=int(manifest["embargo_candles"]),
            ),
            metrics=metrics,
            baseline_metrics=baselines,
            promoted=promoted,
            promotion_reason=reason,
            sha256="",
            code_version=code_version(),
            config=json.loads(json.dumps(config, default=str)),
        )
        targets = PublishTargets(opts.registry, opts.hub_repo_id, opts.hub_token, opts.hub_endpoint)
        extra = card_sections(meta, matrices)
        published, hub = stage_and_publish(
            meta, onnx_path, lambda m: model_card(m, cards, extra), targets, tmp_path / "tokenizer"
        )
    return ClassifierResult(published, hub, promoted, reason, cards, result, check, {"confusion_matrices": matrices})


def _describe(encoder, label: str) -> dict:
    c = encoder.config
    return {
        "model_type": c.model_type, "name_or_path": label, "image_size": getattr(c, "image_size", None),
        "hidden_size": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
        "parameters": int(sum(p.numel() for p in encoder.parameters())),
    }


def card_sections(meta: ModelPackage, matrices: dict[str, dict[str, list[list[int]]]]) -> list[str]:
    """The chart classifier's own sections of the model card (the trainer's card holds the rest)."""
    cfg = meta.config
    enc = cfg["model"]["encoders"]
    out = [
        "## Chart classifier (seed 001)", "",
        f"- Input: the `{CHART_PRESET}` chart ({cfg['chart']['width']}x{cfg['chart']['height']} px, "
        f"{meta.lookback} candles, volume, {', '.join(cfg['chart']['indicators'])}) and the last candle's text "
        f"(`{cfg['text']['template']}`), tokenised by `tokenizer/` to {cfg['text']['max_tokens']} tokens.",
        f"- Vision encoder: {enc['vision']['name_or_path']} ({enc['vision']['parameters']:,} parameters, "
        f"{'trained' if cfg['training']['train_vision'] else 'frozen'}); text encoder: {enc['text']['name_or_path']} "
        f"({enc['text']['parameters']:,} parameters, {'trained' if cfg['training']['train_text'] else 'frozen'}); "
        f"the text's [CLS] attends over the patch tokens ({cfg['model']['heads']}-head cross-attention).",
        f"- Loss: cross-entropy + {cfg['model']['forecast_loss_weight']} x Huber on the scaled next close.",
        f"- Labels: {cfg['labels']['rule']}; neutral_atr_multiple {cfg['labels']['neutral_atr_multiple']}. "
        f"Class counts (bearish, neutral, bullish): {json.dumps(cfg['dataset']['class_counts'])}.",
        f"- Next close: {cfg['next_close']}.", "",
        "Confusion matrices (rows: true class, columns: predicted; bearish, neutral, bullish):", "",
    ]
    for split, ms in matrices.items():
        for who, m in ms.items():
            out.append(f"- {split}, {who}: `{m}`")
    return out + [""]
