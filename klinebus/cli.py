"""klinebus: Binance klines -> indicators, charts, predictions and alerts over Redis Streams.

``klinebus run <service>`` starts one service; ``klinebus demo`` runs the whole
pipeline on shipped candles; services add their own subcommands through
``services/<name>/cli.py:register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from libs.common.errors import CliError
from libs.common.launch import exit_status, run_app

SERVICES = ("ingest", "archive", "features", "charts", "inference", "vlm", "trainer", "alerts")
# `archive` is the Parquet archiver that ships with ingest (and its extra).
_APP_MODULES = {"archive": "services.ingest.archive_app"}
_EXTRAS = {"archive": "ingest"}

log = logging.getLogger("klinebus.cli")


def app_module(service: str):
    name = _APP_MODULES.get(service, f"services.{service}.app")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
            raise CliError(f"service {service!r} is not built yet (no {name})") from None
        raise CliError(
            f"service {service!r} needs the package {exc.name!r}: pip install 'klinebus[{_EXTRAS.get(service, service)}]'"
        ) from None


def _cmd_run(args: argparse.Namespace) -> None:
    run_app(app_module(args.service))


def _cmd_demo(args: argparse.Namespace) -> None:
    from klinebus.demo import run_demo

    run_demo(args)


def _cmd_asyncapi(args: argparse.Namespace) -> None:
    from klinebus.asyncapi import check_or_write

    check_or_write(args.output, check=args.check)


def _cmd_tail(args: argparse.Namespace) -> None:
    from klinebus.tail import tail

    tail(args.topic, args.count, args.redis_url)


def _cmd_acl(args: argparse.Namespace) -> None:
    from libs.common import acl

    passwords = acl.passwords_from_env()
    if args.format == "commands":
        sys.stdout.write(acl.acl_setuser_commands(passwords))
    else:
        import os

        sys.stdout.write(acl.acl_file(passwords, os.environ.get(acl.password_env("admin")) or None))


def _cmd_partitions(args: argparse.Namespace) -> None:
    import asyncio

    from libs.common.bus import redis_client
    from libs.common.bus.groups import partitions_status, set_partitions
    from libs.common.settings import ServiceSettings, load_settings

    url = args.redis_url or load_settings(ServiceSettings).redis_url
    if not url or url == "embedded":
        raise SystemExit("klinebus partitions: give --redis-url or KLINEBUS_REDIS_URL (a running Redis)")

    async def run() -> None:
        client = redis_client(url)
        try:
            if args.action == "set":
                if args.count is None:
                    raise SystemExit("klinebus partitions set: give the new count")
                try:
                    before = await set_partitions(client, args.count)
                except ValueError as exc:
                    raise SystemExit(f"klinebus partitions: {exc}") from None
                print(f"partitions: {before if before is not None else 'none recorded'} -> {args.count}; start every "
                      f"service with KLINEBUS_PARTITIONS={args.count}")
                return
            recorded, rows = await partitions_status(client)
            print(f"partitions: {recorded if recorded is not None else 'none recorded (1 until a service starts)'}")
            for key, group, lag, pending in rows:
                print(f"  {key}  {group}: lag {lag if lag >= 0 else '?'}, pending {pending}")
        finally:
            await client.aclose()

    asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klinebus", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run one service until SIGTERM/Ctrl-C")
    p.add_argument("service", choices=SERVICES)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="the whole pipeline on shipped candles, live in the terminal, no network")
    p.add_argument("--candles", type=int, default=180, help="closed candles to replay per symbol (default 180)")
    p.add_argument("--speed", type=float, default=600.0, help="simulated seconds per real second (default 600)")
    p.add_argument("--symbols", default="BTCUSDT,ETHUSDT,SOLUSDT", help="symbols from data/klines (comma-separated)")
    p.add_argument("--data-dir", default=None, help="where outputs go (default: a fresh folder under var/demo)")
    p.add_argument("--plain", action="store_true", help="print progress lines instead of the live table")
    p.add_argument("--train-epochs", type=int, default=3, help="epochs of the demo's forecaster (default 3)")
    p.add_argument("--no-model", action="store_true", help="skip training: serve persistence only")
    p.add_argument("--no-vlm", action="store_true", help="skip the vision-language model")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("asyncapi", help="write (or --check) docs/asyncapi.yaml from the service apps")
    p.add_argument("--output", default="docs/asyncapi.yaml")
    p.add_argument("--check", action="store_true", help="fail if the file is out of date")
    p.set_defaults(func=_cmd_asyncapi)

    p = sub.add_parser("tail", help="print the last events of a topic")
    p.add_argument("topic")
    p.add_argument("-n", "--count", type=int, default=10)
    p.add_argument("--redis-url", default=None, help="default: KLINEBUS_REDIS_URL")
    p.set_defaults(func=_cmd_tail)

    p = sub.add_parser(
        "acl",
        help="print the Redis ACL users (one per service, Redis >= 7) from the topic declarations",
        description="Passwords come from KLINEBUS_ACL_<SERVICE>_PASSWORD (only their SHA-256 is printed); "
        "a service without one is written 'off'. KLINEBUS_ACL_ADMIN_PASSWORD turns klinebus-admin on.",
    )
    p.add_argument("--format", choices=("file", "commands"), default="file",
                   help="file: an aclfile (default); commands: ACL SETUSER lines for redis-cli")
    p.set_defaults(func=_cmd_acl)

    p = sub.add_parser(
        "partitions",
        help="show the recorded partition count (and each group's lag), or set a new one",
        description="set N is refused unless every group of every partitioned topic has lag 0 and nothing "
        "pending (docs/bus.md#changing-the-partition-count).",
    )
    p.add_argument("action", nargs="?", choices=("show", "set"), default="show")
    p.add_argument("count", nargs="?", type=int)
    p.add_argument("--redis-url", default=None, help="default: KLINEBUS_REDIS_URL")
    p.set_defaults(func=_cmd_partitions)

    for service in SERVICES:
        try:
            module = importlib.import_module(f"services.{service}.cli")
            # register() may import its extra's packages too (the trainer's dataset builders: pandas)
            module.register(sub)
        except ModuleNotFoundError as exc:
            # No subcommands (or not built yet), or this image lacks that service's extra: one
            # image per service must still run its own service (tests/deploy/test_image_files.py).
            log.debug("no %s subcommands: %s", service, exc)
            continue
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def parse_and_run() -> None:
        args = build_parser().parse_args(argv)
        args.func(args)

    return exit_status(parse_and_run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
