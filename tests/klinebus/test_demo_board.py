"""The demo's live table reads the intervals and the range forecast as any subscriber would: from
the JSON of predictions.v1 and scores.v1 events (no pipeline here: the events are written by hand)."""

from __future__ import annotations

from rich.console import Console

from klinebus.demo import Board, _absorb
from libs.common import topics
from libs.common.contracts import PredictionEvent, ScoreEvent

KEY = dict(symbol="BTCUSDT", interval="1m", open_time=0, model_version="1", target_open_time=60_000, last_close=100.0)


def _score(target: str, covered: bool, model: str) -> dict:
    return ScoreEvent(symbol="BTCUSDT", interval="1m", open_time=60_000, model=model, model_version="1", horizon=1,
                      forecast_open_time=0, predicted_close=1.0, actual_close=1.0, baseline_close=1.0, abs_error=0.0,
                      baseline_abs_error=0.0, window=1, rolling_mae=0.0, rolling_baseline_mae=0.0, target=target,
                      lower=0.5, upper=2.0, covered=covered).model_dump(mode="json")


def test_the_table_shows_the_close_band_the_range_forecast_and_how_often_the_bands_held():
    board = Board(expected=1, symbols=["BTCUSDT"])
    preds = topics.stream_key(topics.PREDICTIONS)
    close = PredictionEvent(**KEY, model="lstm-close-unified-1m", predicted={"close": 100.5},
                            quantiles={"close@1": {"0.1": 99.75, "0.5": 100.5, "0.9": 101.25}}, role="shadow")
    rng = PredictionEvent(**KEY, model="range-vol-unified-1m", target="range", predicted={"range": 0.42, "rvol16": 0.003},
                          quantiles={"range@1": {"0.1": 0.21, "0.5": 0.4, "0.9": 0.93}})
    for event in (close, rng):
        _absorb(board, preds, event.model_dump(mode="json"))
    for target, covered in (("close", True), ("close", False), ("range", True)):
        _absorb(board, topics.stream_key(topics.SCORES), _score(target, covered, "m"))
    assert board.model_prediction["BTCUSDT"] == (100.5, "shadow")
    assert board.model_band["BTCUSDT"] == (99.75, 101.25)
    assert board.range_prediction["BTCUSDT"] == (0.42, 0.21, 0.93)
    assert dict(board.coverage) == {"close@1": [1, 2], "range@1": [1, 1]}
    console = Console(width=300, record=True)
    console.print(board.table())
    text = console.export_text()
    assert "99.7500 – 101.2500" in text and "0.4200 [0.2100 – 0.9300]" in text
    assert "close@1 1/2 (50%)" in text and "range@1 1/1 (100%)" in text
