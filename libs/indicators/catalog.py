"""Every feature the engine computes: name, column index, warm-up, definition, reference.

The kernel in ``kernels.py`` writes column ``FEATURE_INDEX[name]``; this module is
the single list both the kernel layout and the docs table are checked against.

``lookback`` follows TA-Lib's meaning: the index of the first valid value, i.e. how
many candles must come before it. A feature is NaN (batch) or absent (streaming)
for candles ``0 .. lookback-1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    lookback: int
    definition: str
    reference: str


def _ma(kind: str, n: int) -> Feature:
    if kind == "sma":
        return Feature(f"sma_{n}", n - 1, f"mean of the last {n} closes", f"talib.SMA(close, {n})")
    return Feature(
        f"ema_{n}",
        n - 1,
        f"EMA, k=2/({n}+1), seeded with the SMA of the first {n} closes",
        f"talib.EMA(close, {n})",
    )


FEATURES: tuple[Feature, ...] = (
    Feature("open", 0, "candle open", "input"),
    Feature("high", 0, "candle high", "input"),
    Feature("low", 0, "candle low", "input"),
    Feature("close", 0, "candle close", "input"),
    Feature("volume", 0, "candle base-asset volume", "input"),
    *(_ma("sma", n) for n in (10, 20, 50, 100, 200)),
    *(_ma("ema", n) for n in (10, 20, 50, 100, 200)),
    Feature("rsi_14", 14, "Wilder RSI(14); 0 when avg gain+loss is ~0 (TA-Lib TA_IS_ZERO)", "talib.RSI(close, 14)"),
    Feature("rsi_21", 21, "Wilder RSI(21); same rules as rsi_14", "talib.RSI(close, 21)"),
    Feature(
        "macd",
        33,
        "EMA12 - EMA26 with TA-Lib seeding: EMA26 seeded by SMA of closes 0..25, EMA12 by SMA of "
        "closes 14..25 (so both start at candle 25); published from candle 33 with the signal",
        "talib.MACD(close, 12, 26, 9)[0]",
    ),
    Feature("macd_signal", 33, "EMA9 of macd, seeded by SMA of macd at candles 25..33", "talib.MACD(...)[1]"),
    Feature("macd_hist", 33, "macd - macd_signal", "talib.MACD(...)[2]"),
    Feature(
        "stoch_k",
        17,
        "slow %K: SMA3 of fast %K = 100*(close-LL14)/(HH14-LL14) (0 when HH14==LL14)",
        "talib.STOCH(h, l, c, 14, 3, SMA, 3, SMA)[0]",
    ),
    Feature("stoch_d", 17, "slow %D: SMA3 of slow %K", "talib.STOCH(h, l, c, 14, 3, SMA, 3, SMA)[1]"),
    Feature("roc_12", 12, "100*(close/close[t-12] - 1)", "talib.ROC(close, 12)"),
    Feature("mom_10", 10, "close - close[t-10]", "talib.MOM(close, 10)"),
    Feature(
        "bb_upper",
        19,
        "SMA20 + 2*sigma20; sigma = population std of the last 20 closes, two-pass over the window "
        "(no running sum of squares, so no drift)",
        "talib.BBANDS(close, 20, 2, 2, SMA)[0]",
    ),
    Feature("bb_middle", 19, "SMA20 of close", "talib.BBANDS(...)[1]"),
    Feature("bb_lower", 19, "SMA20 - 2*sigma20", "talib.BBANDS(...)[2]"),
    Feature(
        "bb_width",
        19,
        "100*(bb_upper-bb_lower)/bb_middle",
        "ta.volatility.BollingerBands(close, 20, 2).bollinger_wband()",
    ),
    Feature(
        "bb_pctb",
        19,
        "(close-bb_lower)/(bb_upper-bb_lower), 0.5 when the bands coincide (flat window; `ta` gives NaN)",
        "ta.volatility.BollingerBands(close, 20, 2).bollinger_pband()",
    ),
    Feature(
        "atr_14",
        14,
        "Wilder ATR(14): SMA of TR at candles 1..14, then (atr*13+tr)/14",
        "talib.ATR(h, l, c, 14)",
    ),
    Feature("natr_14", 14, "100*atr_14/close", "talib.NATR(h, l, c, 14)"),
    Feature(
        "adx_14",
        27,
        "Wilder ADX(14) with TA-Lib seeding: DM/TR summed over candles 1..13, Wilder-smoothed from 14, "
        "ADX = mean of DX at 14..27 then Wilder-smoothed",
        "talib.ADX(h, l, c, 14)",
    ),
    Feature("plus_di_14", 14, "100*smoothed(+DM)/smoothed(TR), TA-Lib seeding", "talib.PLUS_DI(h, l, c, 14)"),
    Feature("minus_di_14", 14, "100*smoothed(-DM)/smoothed(TR), TA-Lib seeding", "talib.MINUS_DI(h, l, c, 14)"),
    Feature(
        "kc_upper",
        19,
        "EMA20(close) + 2*ATR10 (StockCharts/Raschke Keltner Channels)",
        "talib.EMA(close, 20) + 2*talib.ATR(h, l, c, 10)",
    ),
    Feature("kc_middle", 19, "EMA20(close)", "talib.EMA(close, 20)"),
    Feature("kc_lower", 19, "EMA20(close) - 2*ATR10", "talib.EMA(close, 20) - 2*talib.ATR(h, l, c, 10)"),
    Feature("obv", 0, "on-balance volume, starting at the first candle's volume", "talib.OBV(close, volume)"),
    Feature(
        "cmf_20",
        19,
        "sum20(volume*((c-l)-(h-c))/(h-l)) / sum20(volume); the multiplier is 0 when h==l, "
        "cmf is 0 when sum20(volume)==0",
        "ta.volume.ChaikinMoneyFlowIndicator(h, l, c, v, 20)",
    ),
    Feature(
        "mfi_14",
        14,
        "money flow index(14) on typical price (h+l+c)/3; 0 when pos+neg flow < 1 (TA-Lib rule)",
        "talib.MFI(h, l, c, v, 14)",
    ),
    Feature(
        "vpt",
        1,
        "cumulative volume*(close/close[t-1]-1), starting at candle 1",
        "ta.volume.VolumePriceTrendIndicator(close, volume)",
    ),
    Feature(
        "hv_20",
        20,
        "sample std (ddof=1) of the last 20 log returns ln(c/c[t-1]); not annualised",
        "numpy: log(close).diff().rolling(20).std() (pandas)",
    ),
    Feature("price_change", 1, "close/close[t-1] - 1", "pandas close.pct_change()"),
    Feature(
        "volume_change",
        1,
        "volume/volume[t-1] - 1; 0 when the previous volume is 0 (pandas gives inf/NaN)",
        "pandas volume.pct_change()",
    ),
    Feature("hl2", 0, "(high+low)/2", "talib.MEDPRICE(h, l)"),
    Feature(
        "cdl_hammer",
        11,
        "100 when: body < avg body(10 prior); lower shadow > body; upper shadow < 0.1*avg range(10 prior); "
        "min(o,c) <= low[t-1] + 0.2*avg range(5 before t-1); else 0",
        "talib.CDLHAMMER",
    ),
    Feature(
        "cdl_engulfing",
        2,
        "+-100 when the body engulfs the prior opposite-colour body, +-80 when one end is equal; sign = colour",
        "talib.CDLENGULFING",
    ),
    Feature("cdl_doji", 10, "100 when body <= 0.1*avg range(10 prior), else 0", "talib.CDLDOJI"),
    Feature(
        "cdl_shootingstar",
        11,
        "-100 when: body gaps up from prior body; body < avg body(10 prior); upper shadow > body; "
        "lower shadow < 0.1*avg range(10 prior); else 0",
        "talib.CDLSHOOTINGSTAR",
    ),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}
LOOKBACK: dict[str, int] = {f.name: f.lookback for f in FEATURES}
N_FEATURES = len(FEATURES)


class UnknownFeature(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want one plain line
        return str(self.args[0])


def resolve(names: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a list of feature names (None: all), keeping the caller's order."""
    if names is None:
        return FEATURE_NAMES
    unknown = [n for n in names if n not in FEATURE_INDEX]
    if unknown:
        raise UnknownFeature(f"unknown feature(s) {unknown}; known: {', '.join(FEATURE_NAMES)}")
    if len(set(names)) != len(names):
        raise UnknownFeature(f"duplicate feature names in {list(names)}")
    return tuple(names)

