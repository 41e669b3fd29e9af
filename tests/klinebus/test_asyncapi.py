"""The checked-in AsyncAPI document is what the apps generate: a contract change is a visible diff."""

from pathlib import Path

import yaml

from libs.common import topics
from klinebus.asyncapi import built_services, generate

DOC = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


def test_checked_in_document_is_up_to_date():
    assert DOC.exists(), "docs/asyncapi.yaml is missing: run `make asyncapi`"
    assert DOC.read_text() == generate(), "docs/asyncapi.yaml is stale: run `make asyncapi` and commit it"


def test_document_describes_every_built_service_topic():
    doc = yaml.safe_load(generate())
    addresses = {c["address"] for c in doc["channels"].values()}
    assert topics.stream_key(topics.DEAD_LETTERS) in addresses
    assert {"ingest", "features", "inference"} <= set(built_services())
    for topic in (topics.KLINES, topics.FEATURES, topics.PREDICTIONS):
        assert topics.stream_key(topic) in addresses
    schemas = doc["components"]["schemas"]
    assert {"KlineEvent", "FeaturesEvent", "PredictionEvent", "DeadLetter"} <= set(schemas)
    assert "schema_version" in schemas["PredictionEvent"]["properties"]
