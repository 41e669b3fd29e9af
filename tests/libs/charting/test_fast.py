"""The fast path draws what plain mplfinance draws."""

from __future__ import annotations

import numpy as np

from libs.charting.fast import FastRenderer
from libs.charting.figure import render_plain
from libs.charting.pool import RenderPool
from libs.charting.presets import ANALYSIS, CLASSIFIER224
from libs.charting.window import check_window

from tests.libs.charting.conftest import rms

SAME_PICTURE_RMS = 0.5  # grey levels; measured 0.0 (pixel-identical) when written


def test_fast_equals_plain_over_successive_windows(full):
    preset = ANALYSIS.sized(window=120, width_px=800, height_px=600)
    fast = FastRenderer(preset)
    for end in (150, 220, 300, 180):  # reuse in any order, not only forward
        w = check_window(full.slice(0, end), preset.window)
        assert rms(fast.render(w), render_plain(w, preset)) <= SAME_PICTURE_RMS


def test_fast_equals_plain_classifier(full):
    fast = FastRenderer(CLASSIFIER224)
    for end in (100, 300):
        w = check_window(full.slice(0, end), CLASSIFIER224.window)
        assert rms(fast.render(w), render_plain(w, CLASSIFIER224)) <= SAME_PICTURE_RMS


def test_fast_path_really_swaps_data(full):
    fast = FastRenderer(CLASSIFIER224)
    a = fast.render(full.slice(0, 100))
    b = fast.render(full.slice(0, 300))
    assert rms(a, b) > 5


def test_pool_worker_renders_the_same_picture(full):
    w = check_window(full, CLASSIFIER224.window)
    with RenderPool(workers=1) as pool:
        got = pool.submit(w, CLASSIFIER224).result(timeout=120)
    assert rms(got, render_plain(w, CLASSIFIER224)) <= SAME_PICTURE_RMS
    with RenderPool(workers=0) as inline:
        assert np.array_equal(np.frombuffer(inline.submit(w, CLASSIFIER224).result(), np.uint8),
                              np.frombuffer(FastRenderer(CLASSIFIER224).render(w), np.uint8))
