"""What a chart shows and how big it is: the two presets and their knobs."""

from __future__ import annotations

from dataclasses import dataclass, replace

from libs.charting.window import ChartInputError

# Indicator names as the features service publishes them (services/features).
SMA = "sma_20"
EMA = "ema_20"
RSI = "rsi_14"
MACD = "macd"
MACD_SIGNAL = "macd_signal"
MACD_HIST = "macd_hist"
HAMMER = "cdl_hammer"
ENGULFING = "cdl_engulfing"

MIN_WINDOW = 2  # one candle has no time axis to speak of
MAX_WINDOW = 2000  # beyond this candles are thinner than a pixel at any sane size
MIN_SIDE_PX = 64
MAX_SIDE_PX = 8000


@dataclass(frozen=True)
class ChartPreset:
    name: str
    window: int
    width_px: int
    height_px: int
    dpi: int = 100
    style: str = "binance"
    overlays: tuple[str, ...] = (SMA, EMA)
    volume: bool = True
    macd: bool = True
    rsi: bool = True
    patterns: bool = True
    axis_text: bool = True  # tick labels, axis labels, title, legend
    datetime_format: str = "%m-%d %H:%M"

    @property
    def indicator_names(self) -> tuple[str, ...]:
        names = list(self.overlays)
        if self.macd:
            names += [MACD, MACD_SIGNAL, MACD_HIST]
        if self.rsi:
            names.append(RSI)
        if self.patterns:
            names += [HAMMER, ENGULFING]
        return tuple(names)

    def sized(self, window: int | None = None, width_px: int | None = None, height_px: int | None = None) -> "ChartPreset":
        p = replace(
            self,
            window=self.window if window is None else window,
            width_px=self.width_px if width_px is None else width_px,
            height_px=self.height_px if height_px is None else height_px,
        )
        if not MIN_WINDOW <= p.window <= MAX_WINDOW:
            raise ChartInputError(f"window must be {MIN_WINDOW}..{MAX_WINDOW} candles, got {p.window}")
        for side in (p.width_px, p.height_px):
            if not MIN_SIDE_PX <= side <= MAX_SIDE_PX:
                raise ChartInputError(f"chart size must be {MIN_SIDE_PX}..{MAX_SIDE_PX} px a side, got {p.width_px}x{p.height_px}")
        return p


# Seed 000: the analysis chart the vision model and people read; 60 one-minute candles.
# 1000x750 stays under the 1280 visual tokens (28x28 px each) Qwen2.5-VL's model card suggests as
# a cap, so the model sees it unresampled; see docs/charts.md.
ANALYSIS = ChartPreset(name="analysis", window=60, width_px=1000, height_px=750)

# Seed 001: 224x224 images for the chart classifier (ViT-base-patch16-224): candles, volume and
# moving averages, no text, every window scaled to its own price range the same way.
CLASSIFIER224 = ChartPreset(
    name="classifier224",
    window=30,
    width_px=224,
    height_px=224,
    macd=False,
    rsi=False,
    patterns=False,
    axis_text=False,
)

PRESETS: dict[str, ChartPreset] = {p.name: p for p in (ANALYSIS, CLASSIFIER224)}


def get_preset(name: str) -> ChartPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ChartInputError(f"unknown chart preset {name!r}; known: {', '.join(PRESETS)}") from None
