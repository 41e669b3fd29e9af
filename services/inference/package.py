"""What serving needs from a model package, read through libs/common/model_package and checked.

A package (../shared/DESIGN.md, "Model packages"; the format is ``libs.common.model_package``)
is verified (every file against its manifest, the manifest's sha256 against the digest
``models.v1`` announced, schema, graph input/output names) before anything loads it, and an
announced one only from the configured model sources (``Sources``: registry roots, Hub owners). Everything
done to an input before the session sees it (which features, in which order, how scaled, how
many candles) comes from the package and nowhere else, so a model is served as it was trained.

Pure domain: no bus, no onnxruntime. ``PackageError`` is one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.common import model_package as mp
from libs.common.model_package import PackageError
from libs.indicators.feature_sets import UnknownFeatureSet, get_feature_set

__all__ = ["PackageError", "NotServable", "ModelSpec", "Output", "Scaler", "Intervals", "load_package",
           "spec_from_package", "PRICES", "PROBS", "LEVELS"]

PRICES = "prices"  # columns are (target price, horizon): open/high/low/close at h candles ahead
PROBS = "probs"  # columns are class probabilities
LEVELS = "levels"  # columns are (target, horizon) of non-price targets: range@1, rvol@16 (range-vol)
RANGE_VOL = "range-vol"
# Non-price targets serving reads, and the name each is published under (``predicted`` keys carry
# the horizon where it is part of the meaning: rvol16 = realised vol of the next 16 candles).
LEVEL_TARGETS = ("range", "rvol")
PRICE_NAMES = ("open", "high", "low", "close")
# The trainer's target when a graph leaves decoding to the caller: log(price[t+h] / close[t]).
LOG_RETURN = "log_return_vs_last_close"


class NotServable(PackageError):
    """A sound package of a kind this service does not serve from features.v1 (e.g. the chart
    classifier, which reads images and text): not an error of the package."""


@dataclass(frozen=True)
class Scaler:
    """``scaled = (x - center) / scale`` per column."""

    center: tuple[float, ...]
    scale: tuple[float, ...]


@dataclass(frozen=True)
class Intervals:
    """The package's split-conformal band (``config.intervals``), per column ``target@horizon``.

    ``band = forecast * exp(q * scale)`` with ``q`` the stored 10/50/90 % quantiles of the gate
    slice's ``log(actual / forecast)`` (divided by the scale when the trainer scaled them) and
    ``scale`` = ``exp(mean(log(max(high - low, 1e-5 close) / close)))`` over the window's last
    ``scale_candles`` rows (the whole window when it is shorter, as the trainer's ``vol_scale``
    slices; 1 when ``scale_candles`` is 0: a fixed band). The persistence baseline's
    band is ``persistence * exp(q_persistence)`` (gate-slice empirical quantiles, never scaled)."""

    levels: tuple[float, ...]  # (0.1, 0.5, 0.9)
    columns: tuple[str, ...]  # "close@1", "range@1", ...
    quantiles: tuple[tuple[float, ...], ...]  # per column, per level
    baseline: tuple[tuple[float, ...], ...] | None  # persistence's, same layout
    scale_candles: int = 0


@dataclass(frozen=True)
class Output:
    name: str
    kind: str  # PRICES, LEVELS or PROBS
    columns: tuple[Any, ...]  # PRICES: ((target, horizon), ...), horizon-major; LEVELS: pairs; PROBS: class names
    decode: str = "none"  # "none": prices as they come; LOG_RETURN: last_close * exp(value)
    scaler: Scaler | None = None  # applied inversely before decoding


@dataclass(frozen=True)
class ModelSpec:
    """A servable model: identity, the exact preprocessing, and what its outputs mean."""

    name: str
    version: str
    kind: str
    feature_set: str  # "" for a model that reads only the close (persistence)
    features: tuple[str, ...]
    lookback: int
    input_name: str
    input_dtype: str
    input_rank: int  # 3: [batch, lookback, features]; 2: [batch, lookback] (one column)
    outputs: tuple[Output, ...]
    horizons: tuple[int, ...]
    pairs: frozenset[tuple[str, str]] | None  # None: every (symbol, interval)
    scaler: Scaler | None  # inputs, when the caller scales
    sha256: str  # the package digest (sha256 of its manifest), what models.v1 announces
    promoted: bool
    path: Path | None = None
    meta: Any = field(default=None, compare=False, repr=False)
    intervals: Intervals | None = None
    # Cumulative features among ``features`` (obv, vpt: their level depends on where the computation
    # started) and, per (symbol, interval), the open time of the candle the trainer started from.
    cumulative: tuple[str, ...] = ()
    origins: dict[tuple[str, str], int] = field(default_factory=dict, compare=False)

    @property
    def reads_close_only(self) -> bool:
        return self.feature_set == ""

    def serves(self, symbol: str, interval: str) -> bool:
        return self.pairs is None or (symbol, interval) in self.pairs

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def _scaler(raw: mp.Scaler, want: list[str], what: str) -> Scaler:
    """The scaler's columns put in ``want``'s order (the package says which column is which)."""
    index = {c: i for i, c in enumerate(raw.columns)}
    missing = [c for c in want if c not in index]
    if missing:
        raise PackageError(f"scalers[{what!r}] has no column(s) {missing}")
    return Scaler(tuple(raw.center[index[c]] for c in want), tuple(raw.scale[index[c]] for c in want))


def _outputs(meta: mp.ModelPackage) -> tuple[Output, ...]:
    caller = meta.input_scaling == "caller"
    price_targets = [t for t in meta.targets if t in PRICE_NAMES]
    outs = []
    for o in meta.outputs:
        if o.dtype not in ("float32", "float64"):
            raise PackageError(f"output {o.name!r} is {o.dtype}; serving reads float outputs")
        text = f"{o.name} {o.meaning}".lower()
        if "prob" in text:
            classes = meta.config.get("classes") or meta.targets
            if not classes:
                raise PackageError(f"output {o.name!r} holds probabilities but the package names no classes")
            outs.append(Output(o.name, PROBS, tuple(str(c) for c in classes)))
            continue
        if meta.kind == RANGE_VOL:
            if o.name == "quantiles":  # the same band the service computes from config.intervals
                continue
            if list(meta.targets) != list(LEVEL_TARGETS) or len(meta.horizons) != len(meta.targets):
                raise PackageError(f"range-vol targets {meta.targets} / horizons {meta.horizons} are not "
                                   f"{list(LEVEL_TARGETS)} with one horizon each")
            dims = o.shape[1:]
            if dims and all(isinstance(d, int) for d in dims) and int(_prod(dims)) != len(meta.targets):
                raise PackageError(f"output {o.name!r} {o.shape} cannot hold {len(meta.targets)} targets")
            outs.append(Output(o.name, LEVELS, tuple(zip(meta.targets, meta.horizons))))
            continue
        if not price_targets or len(price_targets) != len(meta.targets):
            raise PackageError(f"targets {meta.targets} are not prices ({', '.join(PRICE_NAMES)}); cannot read {o.name!r}")
        columns = tuple((t, h) for h in meta.horizons for t in meta.targets)
        decode, scaler = "none", None
        if caller:
            decode = meta.config.get("target_transform", LOG_RETURN)
            if decode != LOG_RETURN:
                raise PackageError(f"target_transform {decode!r} is not one serving can decode ({LOG_RETURN})")
            if "targets" in meta.scalers:
                scaler = _scaler(meta.scalers["targets"], [f"{t}@{h}" for t, h in columns], "targets")
        dims = o.shape[1:]
        if dims and all(isinstance(d, int) for d in dims) and int(_prod(dims)) != len(columns):
            raise PackageError(f"output {o.name!r} {o.shape} cannot hold {len(columns)} columns "
                               f"({len(meta.targets)} targets x {len(meta.horizons)} horizons)")
        outs.append(Output(o.name, PRICES, columns, decode, scaler))
    if not outs:
        raise PackageError("the package declares no outputs")
    return tuple(outs)


def _intervals(meta: mp.ModelPackage) -> Intervals | None:
    """``config.intervals`` read and checked; None for a package without them (older packages)."""
    cfg = (meta.config or {}).get("intervals")
    if not cfg:
        return None
    try:
        levels = tuple(float(q) for q in cfg["quantiles"])
        columns = tuple(str(c) for c in cfg["columns"])
        q = tuple(tuple(float(v) for v in row) for row in cfg["log_residual_quantiles"])
        base = cfg.get("persistence_log_residual_quantiles")
        base = tuple(tuple(float(v) for v in row) for row in base) if base else None
        scale = cfg.get("scale") or {}
        candles = int(scale.get("candles") or 0) if scale.get("kind", "none") != "none" else 0
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"config.intervals is malformed: {exc}") from None
    if len(q) != len(columns) or any(len(r) != len(levels) for r in q) or (
            base is not None and (len(base) != len(columns) or any(len(r) != len(levels) for r in base))):
        raise PackageError(f"config.intervals holds {len(q)} quantile rows for {len(columns)} columns of {len(levels)} levels")
    if candles and not {"high", "low", "close"} <= set(meta.features):
        raise PackageError("config.intervals scales the band by the window's range but the features lack high, low or close")
    return Intervals(levels, columns, q, base, candles)


def _origins(meta: mp.ModelPackage) -> tuple[tuple[str, ...], dict[tuple[str, str], int]]:
    """The package's cumulative features and per-series feature origin (``config.dataset``)."""
    ds = (meta.config or {}).get("dataset") or {}
    cumulative = tuple(f for f in ds.get("cumulative_features") or () if f in meta.features)
    origins = {}
    for s in ds.get("series") or ():
        if isinstance(s, dict) and s.get("feature_origin") is not None and s.get("symbol") and s.get("interval"):
            origins[(str(s["symbol"]), str(s["interval"]))] = int(s["feature_origin"])
    return cumulative, origins


def _prod(dims: list) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def spec_from_package(meta: mp.ModelPackage, folder: Path | str | None = None, digest: str | None = None) -> ModelSpec:
    """The serving view of verified package metadata; ``PackageError`` when it cannot be served
    from ``features.v1`` (another kind of input, an unknown feature set, ...)."""
    if len(meta.inputs) != 1:
        names = [i.name for i in meta.inputs]
        raise NotServable(f"{meta.name}@{meta.version} ({meta.kind}) takes inputs {names}; features.v1 serving feeds one window tensor")
    (inp,) = meta.inputs
    if inp.dtype not in ("float32", "float64") or len(inp.shape) not in (2, 3):
        raise NotServable(f"input {inp.name!r} is {inp.dtype}{inp.shape}; serving feeds float [batch, lookback(, features)]")
    try:
        fs = get_feature_set(meta.feature_set)
    except UnknownFeatureSet as exc:
        raise PackageError(str(exc)) from None
    if fs.id != meta.feature_set:
        raise PackageError(f"feature_set must be a versioned id like {fs.id!r}, got {meta.feature_set!r}")
    unknown = [f for f in meta.features if f not in fs.features]
    if unknown or not meta.features:
        raise PackageError(f"features {unknown or '[]'} are not columns of {fs.id}")
    if len(inp.shape) == 3 and isinstance(inp.shape[2], int) and inp.shape[2] != len(meta.features):
        raise PackageError(f"input {inp.name!r} has {inp.shape[2]} features but 'features' lists {len(meta.features)}")
    if len(inp.shape) == 2 and len(meta.features) != 1:
        raise PackageError(f"input {inp.name!r} {inp.shape} takes one column but 'features' lists {len(meta.features)}")
    if isinstance(inp.shape[1], int) and inp.shape[1] != meta.lookback:
        raise PackageError(f"input {inp.name!r} has lookback {inp.shape[1]} but 'lookback' is {meta.lookback}")
    scaler = None
    if meta.input_scaling == "caller":
        if "inputs" not in meta.scalers:
            raise PackageError("input_scaling is 'caller' but there is no scalers['inputs']")
        scaler = _scaler(meta.scalers["inputs"], list(meta.features), "inputs")
    cumulative, origins = _origins(meta)
    folder = Path(folder) if folder is not None else None
    if digest is None:
        digest = mp.package_digest(folder) if folder is not None else meta.sha256
    return ModelSpec(
        name=meta.name,
        version=meta.version,
        kind=meta.kind,
        feature_set=meta.feature_set,
        features=tuple(meta.features),
        lookback=meta.lookback,
        input_name=inp.name,
        input_dtype=inp.dtype,
        input_rank=len(inp.shape),
        outputs=_outputs(meta),
        horizons=tuple(meta.horizons),
        pairs=frozenset((s.symbol, s.interval) for s in meta.serves) or None,
        scaler=scaler,
        sha256=digest,
        promoted=meta.promoted,
        path=folder / mp.MODEL_FILE if folder is not None else None,
        meta=meta,
        intervals=_intervals(meta),
        cumulative=cumulative,
        origins=origins,
    )


def load_package(uri: str, expected_sha256: str | None, cache_dir: Path | str | mp.Sources) -> ModelSpec:
    """Fetch (remote uris into the cache) and verify a package, then read its serving view.

    With ``mp.Sources`` (the service's way) the uri must lie under a configured source and the
    announced digest is required; a bare ``cache_dir`` with no digest verifies a local folder as it is."""
    if expected_sha256 or isinstance(cache_dir, mp.Sources):
        folder, meta = mp.fetch_package(uri, expected_sha256 or "", cache_dir)
    else:
        folder = Path(uri)
        meta = mp.verify_package(folder)
    return spec_from_package(meta, folder)


def registry_packages(root: Path | str, promoted_only: bool = True) -> list[ModelSpec]:
    """The newest (promoted) version of every model in a local registry (``<root>/<name>/<version>/``),
    verified; a model whose newest promoted version does not verify is left out (its load, when
    announced on models.v1, says why)."""
    reg = mp.Registry(str(root))
    found: list[ModelSpec] = []
    for name in reg.models():
        try:
            version = reg.latest(name, promoted_only=promoted_only)
        except PackageError:
            continue
        if version is None:
            continue
        try:
            found.append(spec_from_package(reg.verify(name, version), reg.path(name, version)))
        except PackageError:
            continue
    return found


def model_sources(settings: Any, model_dir: Path) -> mp.Sources:
    """Where announced packages may come from (``KLINEBUS_MODEL_SOURCES``; default the local
    registry ``model_dir`` only) and where remote ones are cached."""
    cache = Path(settings.model_cache_dir) if settings.model_cache_dir else model_dir / ".cache"
    return mp.Sources(cache, tuple(settings.model_sources or [str(model_dir)]))
