"""The ingest command line: ``klinebus simulate --host`` binds the address it is given (compose:
0.0.0.0); ``klinebus history compact`` merges the archive's part files."""

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


def test_history_compact_merges_each_months_parts(tmp_path, capsys):
    from libs.common.archive import ParquetArchive, read_archive
    from libs.common.klines import read_kline_csv

    ks = read_kline_csv(next(SHIPPED.glob("BTCUSDT-1m-*.csv.gz")))[:30]
    archive = ParquetArchive(str(tmp_path / "a"), compact_after=100)
    for i in range(0, 30, 10):
        archive.write(ks[i : i + 10])
    assert len(archive.files("BTCUSDT", "1m")) == 3
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["history", "compact", "--archive", str(tmp_path / "a")])
    args.func(args)
    assert "3 parts -> 1" in capsys.readouterr().out
    assert len(archive.files("BTCUSDT", "1m")) == 1
    assert list(read_archive(str(tmp_path / "a"), "BTCUSDT", "1m")["open_time"]) == [k.open_time for k in ks]
