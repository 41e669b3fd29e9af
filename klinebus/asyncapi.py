"""The AsyncAPI document, generated from the real service apps.

``docs/asyncapi.yaml`` is checked in so a change to any topic or payload is a
visible diff in review; ``klinebus asyncapi --check`` (and a test) fails when
the file and the code disagree.
"""

from __future__ import annotations

from pathlib import Path

from klinebus.cli import SERVICES, app_module
from libs.common.errors import CliError

TITLE = "klinebus"
VERSION = "1"
DESCRIPTION = (
    "Binance klines -> indicators, charts, ONNX predictions, VLM chart analyses and alerts over Redis Streams. "
    "Each channel is one Redis stream; each entry has one field, __data__, holding the event as JSON."
)


def built_services() -> list[str]:
    out = []
    for service in SERVICES:
        try:
            app_module(service)
        except CliError:
            continue
        out.append(service)
    return out


def generate() -> str:
    """The merged AsyncAPI 3.0 YAML of every built service (stable order, no timestamps)."""
    import yaml  # ships with faststream's CLI extra via pyyaml

    from faststream.specification import AsyncAPI

    brokers = []
    for service in built_services():
        module = app_module(service)
        # A fixed consumer name: the default (the host name) would make the document differ per machine.
        settings = module.SETTINGS(consumer_name="<replica>")
        runtime = module.create(settings, "redis://localhost:6379/0")
        brokers.append(runtime.bus.broker)
    spec = AsyncAPI(*brokers, title=TITLE, version=VERSION, description=DESCRIPTION, schema_version="3.0.0")
    doc = spec.to_specification().to_jsonable()
    # The server address is the builder's placeholder, not a deployment fact.
    for server in doc.get("servers", {}).values():
        server["host"] = "redis:6379"
    return yaml.safe_dump(doc, sort_keys=True, allow_unicode=True, width=110)


def check_or_write(output: str, check: bool = False) -> None:
    text = generate()
    path = Path(output)
    if check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            raise CliError(f"{output} is out of date with the service apps: run `klinebus asyncapi` and commit it")
        print(f"{output} is up to date")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {output}")

