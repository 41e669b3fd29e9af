"""``klinebus simulate --host``: the simulator binds the address it is given (compose: 0.0.0.0)."""

from __future__ import annotations

import argparse

import pytest
from ingest_support import SHIPPED

from services.ingest import cli, simulator


class _Bound(Exception):
    pass


def test_simulate_binds_the_given_host(monkeypatch):
    bound: list = []

    class Probe(simulator.ExchangeSimulator):
        async def wait_done(self) -> None:
            bound.extend(self._runner.addresses)  # the sockets actually listening
            raise _Bound

    monkeypatch.setattr(simulator, "ExchangeSimulator", Probe)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    data = str(next(SHIPPED.glob("BTCUSDT-1m-*.csv.gz")))
    args = parser.parse_args(["simulate", "--host", "0.0.0.0", "--port", "0", "--limit", "3", "--data", data])
    assert args.host == "0.0.0.0"
    with pytest.raises(_Bound):
        args.func(args)
    assert [addr[0] for addr in bound] == ["0.0.0.0"]


def test_simulate_binds_loopback_by_default():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    assert parser.parse_args(["simulate"]).host == "127.0.0.1"
