"""Named, versioned feature lists. A published set never changes: a new list is a new version.

Models record the set id (``name-vN``) they were trained on; serving computes
the same set, in the same column order.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.indicators.catalog import FEATURE_NAMES, LOOKBACK, resolve


@dataclass(frozen=True, slots=True)
class FeatureSet:
    name: str
    version: int
    features: tuple[str, ...]
    description: str

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    @property
    def lookback(self) -> int:
        """Index of the first candle at which every feature of the set has a value."""
        return max(LOOKBACK[f] for f in self.features)

    @property
    def warmup_candles(self) -> int:
        """Candles a key must consume before its first complete feature vector (that candle included)."""
        return self.lookback + 1


_SETS = (
    FeatureSet(
        "skeleton",
        1,
        ("close", "sma_20", "ema_20", "rsi_14"),
        "Smallest useful set, for smoke tests and demos.",
    ),
    FeatureSet(
        "chart-analysis",
        1,
        (
            "open", "high", "low", "close", "volume",
            "sma_20", "ema_20", "rsi_14", "macd", "macd_signal", "macd_hist",
            "cdl_hammer", "cdl_engulfing",
        ),
        "Seed 000 (Qwen2.5-VL chart analysis): SMA, EMA, RSI, MACD, Hammer and Engulfing over the candles.",
    ),
    FeatureSet(
        "bilstm-13",
        1,
        (
            "close", "open", "high", "low", "volume", "atr_14", "bb_upper", "bb_lower",
            "bb_width", "rsi_14", "macd", "hv_20", "bb_pctb",
        ),
        "Seed 002 (Hybrid BiLSTM v7): its 13 input features, in its order.",
    ),
    FeatureSet(
        "lstm-35",
        1,
        (
            "open", "high", "low", "close", "volume",
            "sma_10", "sma_20", "sma_50", "sma_100", "sma_200",
            "ema_10", "ema_20", "ema_50", "ema_100", "ema_200",
            "rsi_14", "rsi_21", "macd", "macd_signal", "macd_hist", "stoch_k", "stoch_d", "roc_12",
            "bb_upper", "bb_middle", "bb_lower", "bb_width", "bb_pctb", "atr_14", "natr_14",
            "adx_14", "plus_di_14", "minus_di_14",
            "kc_upper", "kc_middle", "kc_lower",
            "obv", "cmf_20", "mfi_14", "vpt",
            "mom_10", "price_change", "volume_change", "hl2",
        ),
        "Seed 004 (MOP LSTM): OHLCV plus its 35+ indicators (trend 10, momentum 8, volatility 7, "
        "direction 3, Keltner 3, volume 4, other 4).",
    ),
    FeatureSet(
        "lstm-35",
        2,
        (
            "open", "high", "low", "close", "volume",
            "sma_10", "sma_20", "sma_50", "sma_100", "sma_200",
            "ema_10", "ema_20", "ema_50", "ema_100", "ema_200",
            "rsi_14", "rsi_21", "macd", "macd_signal", "macd_hist", "stoch_k", "stoch_d", "roc_12",
            "bb_upper", "bb_middle", "bb_lower", "bb_width", "bb_pctb", "atr_14", "natr_14",
            "adx_14", "plus_di_14", "minus_di_14",
            "kc_upper", "kc_middle", "kc_lower",
            "cmf_20", "mfi_14",
            "mom_10", "price_change", "volume_change", "hl2",
        ),
        "lstm-35-v1 without the cumulative OBV and VPT, whose values depend on where the computation "
        "started (training from a dataset's first candle, serving from the archive's): the volume "
        "information stays in the windowed cmf_20, mfi_14 and volume_change.",
    ),
    FeatureSet("all", 1, FEATURE_NAMES, "Every feature the engine computes, in catalogue order."),
)

FEATURE_SETS: dict[str, FeatureSet] = {s.id: s for s in _SETS}
DEFAULT_FEATURE_SET = "all-v1"

for _s in _SETS:  # a typo in a set must fail at import, not at serving time
    resolve(_s.features)


class UnknownFeatureSet(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_feature_set(set_id: str | FeatureSet) -> FeatureSet:
    """A set by id (``bilstm-13-v1``); a bare name (``bilstm-13``) means its latest version."""
    if isinstance(set_id, FeatureSet):
        return set_id
    if set_id in FEATURE_SETS:
        return FEATURE_SETS[set_id]
    versions = [s for s in _SETS if s.name == set_id]
    if versions:
        return max(versions, key=lambda s: s.version)
    raise UnknownFeatureSet(f"unknown feature set {set_id!r}; known: {', '.join(FEATURE_SETS)}")
