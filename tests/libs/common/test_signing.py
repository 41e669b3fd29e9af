"""Signed control topics (libs/common/signing.py): the exact bytes signed, rotation by key id, and
refusals that never echo a secret."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from libs.common import topics
from libs.common.contracts import DatasetBuildRequest, ModelPublished
from libs.common.settings import SettingsError, load_settings
from libs.common.signing import Keyring, KeyringError, SignatureError
from services.inference.settings import InferenceSettings

SECRET = "s" * 40


def announcement(**over) -> ModelPublished:
    fields = dict(model="m", version="3", uri="/reg/m/3", sha256="a" * 64, feature_set="lstm-35-v1",
                  train_range=(0, 10), eval_range=(20, 30), metrics={"mae": 1, "rmse": 2.5},
                  baseline_metrics={"persistence": {"mae": 2.0}}, promoted=True, published_at=1_700_000_000_000)
    fields.update(over)
    return ModelPublished(**fields)


def test_the_signature_is_hmac_sha256_of_the_documented_bytes():
    ring = Keyring.parse(f"k1:{SECRET}")
    signed = ring.sign(topics.MODELS, announcement())
    # The documented canonical form, written out here by hand: sorted keys, compact, every field of
    # the contract as JSON (floats as floats), nulls and the signature left out, topic in front.
    body = {"baseline_metrics": {"persistence": {"mae": 2.0}}, "eval_range": [20, 30], "feature_set": "lstm-35-v1",
            "metrics": {"mae": 1.0, "rmse": 2.5}, "model": "m", "promoted": True, "published_at": 1_700_000_000_000,
            "schema_version": 1, "sha256": "a" * 64, "train_range": [0, 10], "uri": "/reg/m/3", "version": "3"}
    data = b"klinebus-control-v1\nmodels.v1\n" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert signed.signature == "k1:" + hmac.new(SECRET.encode(), data, hashlib.sha256).hexdigest()
    assert ring.verify(topics.MODELS, signed) == "k1"
    # what the wire carries verifies too (the consumer's view: decoded by the contract)
    assert ring.verify(topics.MODELS, ModelPublished.model_validate_json(signed.to_json())) == "k1"


def test_a_signature_is_bound_to_every_field_and_to_its_topic():
    ring = Keyring.parse(f"k1:{SECRET}")
    signed = ring.sign(topics.MODELS, announcement())
    for change in [{"uri": "/tmp/evil"}, {"sha256": "b" * 64}, {"promoted": False}, {"metrics": {"mae": 0.5, "rmse": 2.5}},
                   {"version": "2"}, {"published_at": 1}]:
        with pytest.raises(SignatureError) as e:
            ring.verify(topics.MODELS, signed.model_copy(update=change))
        assert e.value.kind == "bad_signature"
    with pytest.raises(SignatureError, match="bad_signature"):
        ring.verify(topics.DATASETS, signed)  # a models.v1 signature is not valid on another topic


def test_rotation_the_first_key_signs_every_key_verifies():
    old = Keyring.parse(f"k1:{SECRET}")
    rotating = Keyring.parse(f"k2:{'t' * 40},k1:{SECRET}")
    after = Keyring.parse(f"k2:{'t' * 40}")
    by_old = old.sign(topics.DATASETS, DatasetBuildRequest(request_id="r", model_kind="lstm-close", symbols=["BTCUSDT"],
                                                           intervals=["15m"], start=0, end=1, feature_set="f"))
    assert rotating.verify(topics.DATASETS, by_old) == "k1"
    by_new = rotating.sign(topics.DATASETS, by_old)
    assert by_new.signature.startswith("k2:") and after.verify(topics.DATASETS, by_new) == "k2"
    with pytest.raises(SignatureError) as e:
        after.verify(topics.DATASETS, by_old)
    assert e.value.kind == "unknown_key"


def test_unsigned_and_garbage_signatures_are_refused():
    ring = Keyring.parse(f"k1:{SECRET}")
    for sig, kind in [(None, "unsigned"), ("", "unsigned"), ("nonsense", "unknown_key"), ("k1:", "bad_signature"),
                      ("k1:" + "0" * 64, "bad_signature")]:
        with pytest.raises(SignatureError) as e:
            ring.verify(topics.MODELS, announcement(signature=sig))
        assert e.value.kind == kind, sig


@pytest.mark.parametrize("value, match", [
    ("k1", "must be <key-id>:<secret>"), ("k1:short", "shorter than 32"), (f"k1:{SECRET},k1:{SECRET}", "appears twice"),
    (f"bad id:{SECRET}", "must be <key-id>:<secret>"),
])
def test_a_malformed_keyring_stops_the_service_in_one_line_without_the_secret(monkeypatch, value, match):
    with pytest.raises(KeyringError, match=match):
        Keyring.parse(value)
    monkeypatch.setenv("KLINEBUS_CONTROL_KEYS", value)
    with pytest.raises(SettingsError) as e:
        load_settings(InferenceSettings)
    text = str(e.value)
    assert "KLINEBUS_CONTROL_KEYS" in text and "\n" not in text
    assert SECRET not in text and "short" not in text.replace("shorter", "")


def test_an_empty_keyring_is_no_keyring():
    assert Keyring.parse(None) is None and Keyring.parse("") is None and Keyring.parse("  ") is None
