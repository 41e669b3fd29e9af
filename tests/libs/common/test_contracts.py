import pytest

from libs.common import topics
from libs.common.contracts import EVENT_TYPES, FeaturesEvent, InvalidEvent, KlineEvent, payload_preview
from libs.common.klines import Kline


def test_every_topic_has_exactly_one_event_type():
    assert set(EVENT_TYPES) == set(topics.ALL_TOPICS)


def test_kline_event_round_trips_a_kline():
    k = Kline("BTCUSDT", "1m", 60_000, 119_999, 1.0, 2.0, 0.5, 1.5, 10.0, 15.0, 7, 4.0, 6.0)
    event = KlineEvent.from_kline(k, source="rest")
    assert event.to_kline() == k
    assert KlineEvent.from_json(event.to_json()) == event


def test_invalid_json_payloads_say_where_in_one_line():
    with pytest.raises(InvalidEvent) as err:
        FeaturesEvent.from_json(b'{"symbol":"BTCUSDT","interval":"1m","open_time":"x"}')
    assert err.value.reason.startswith("FeaturesEvent: open_time:")
    assert "\n" not in err.value.reason


def test_unknown_fields_are_ignored_so_additive_changes_never_break_consumers():
    raw = KlineEvent(symbol="BTCUSDT", interval="1m", open_time=0, close_time=59_999,
                     open=1, high=1, low=1, close=1, volume=0).model_dump()
    raw["added_in_a_later_release"] = 1
    assert KlineEvent.model_validate(raw).open_time == 0


def test_dead_letter_payloads_are_bounded():
    text = payload_preview(b"x" * 10_000, limit=100)
    assert text.startswith("x" * 100) and text.endswith("(+9900 chars)")


GOOD = b'{"symbol":"BTCUSDT","interval":"1m","open_time":60000,"close_time":119999,' \
       b'"open":1.0,"high":2.0,"low":0.5,"close":1.5,"volume":3.0}'


@pytest.mark.parametrize(
    "old, new, needle",
    [
        (b'"open":1.0', b'"open":NaN', "open"),
        (b'"high":2.0', b'"high":-1.0', "high"),
        (b'"volume":3.0', b'"volume":-3.0', "volume"),
        (b'"close_time":119999', b'"close_time":10', "close_time"),
    ],
)
def test_kline_events_must_be_physical(old, new, needle):
    assert KlineEvent.from_json(GOOD).close == 1.5
    with pytest.raises(InvalidEvent) as err:
        KlineEvent.from_json(GOOD.replace(old, new))
    assert needle in err.value.reason


def test_no_topic_accepts_nan_values():
    with pytest.raises(Exception, match="finite"):
        FeaturesEvent(symbol="BTCUSDT", interval="1m", open_time=0, close=1.0, feature_set="x",
                      values={"rsi_14": float("nan")}, warm=True)


def test_the_fast_json_path_writes_what_pydantic_json_mode_writes():
    """Events whose fields are JSON scalars (or lists/dicts of them) serialise their attributes
    directly; the bytes must equal pydantic's JSON mode, field order included."""
    import orjson

    from libs.common.contracts import AlertEvent, AnalysisEvent, ModelPublished, PredictionEvent

    events = [
        KlineEvent(symbol="BTCUSDT", interval="1m", open_time=0, close_time=59_999, open=1, high=2, low=1,
                   close=1, volume=0, trades=3, source="rest"),
        FeaturesEvent(symbol="BTCUSDT", interval="1h", open_time=3_600_000, close=2.5, feature_set="all-v1",
                      values={"rsi_14": 55, "ema_20": 1.25}, warm=True),
        PredictionEvent(symbol="ETHUSDT", interval="1m", open_time=60_000, model="m", model_version="3",
                        target_open_time=120_000, predicted={"close": 2}, last_close=1.0, horizons=[1, 2],
                        path=[2, 2.5], probabilities={"up": 0.25}, role="shadow"),
        AnalysisEvent(symbol="ETHUSDT", interval="1h", open_time=0, chart_uri="file:///c.png", model="vlm",
                      trend="bullish", confidence=0.5, support=[1, 2.5], patterns=["doji"], timings_ms={"total": 3}),
        AlertEvent(rule="r", severity="warning", message="m", value=None, labels={"a": "b"}),
    ]
    for event in events:
        assert type(event)._native_json, type(event).__name__
        assert event.to_json() == orjson.dumps(event.model_dump(mode="json")), type(event).__name__
    assert not ModelPublished._native_json  # tuple fields: pydantic writes them its own way


@pytest.mark.parametrize("warm,origin", [(True, None), (False, None), (True, 1_680_307_200_000)])
def test_prepared_features_events_are_byte_for_byte_the_model_s_json(warm, origin):
    values = {"rsi_14": 55.5, "ema_20": 1.25} if warm else {}
    fields = dict(symbol="BTCUSDT", interval="1h", open_time=3_600_000, close=2.5, feature_set="all-v1",
                  values=values, warm=warm, kline_ingested_at=None if warm else 17, computed_at=99,
                  feature_origin=origin)
    prepared = FeaturesEvent.prepared(**fields)
    model = FeaturesEvent(**fields)
    assert prepared.to_json() == model.to_json()
    assert (prepared.symbol, prepared.interval, prepared.open_time) == (model.symbol, model.interval, model.open_time)
    assert FeaturesEvent.from_json(prepared.to_json()) == model


def test_prediction_intervals_are_optional_and_read_back_unambiguously():
    from libs.common.contracts import PredictionEvent, ScoreEvent

    old = {"schema_version": 1, "symbol": "BTCUSDT", "interval": "15m", "open_time": 0, "model": "m", "model_version": "1",
           "target_open_time": 900_000, "predicted": {"close": 1.0}, "last_close": 1.0}
    legacy = PredictionEvent.model_validate(old)  # an event from before the fields: still valid
    assert legacy.target == "price" and legacy.quantiles is None
    ranged = PredictionEvent(**{**old, "predicted": {"range": 45.0, "rvol16": 0.004}}, target="range",
                             quantiles={"range@1": {"0.1": 25.0, "0.5": 47.0, "0.9": 97.0}})
    back = PredictionEvent.from_json(ranged.to_json())
    assert back.target == "range" and back.quantiles["range@1"]["0.9"] == 97.0
    score = ScoreEvent(symbol="BTCUSDT", interval="15m", open_time=900_000, model="m", model_version="1", horizon=1,
                       forecast_open_time=0, predicted_close=45.0, actual_close=30.0, baseline_close=40.0, abs_error=15.0,
                       baseline_abs_error=10.0, window=1, rolling_mae=15.0, rolling_baseline_mae=10.0, target="range",
                       lower=25.0, upper=97.0, covered=True, rolling_coverage=1.0)
    assert ScoreEvent.from_json(score.to_json()) == score
