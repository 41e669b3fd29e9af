"""The exchange simulator as its own process, for bench/bench_e2e.py.

N streams of real 1m candles (the shipped BTC/ETH/SOL candles under made-up symbols
``S00000BTCUSDT``...), all closing at the same simulated moment, replayed on an accelerated
clock (one candle every ``--every`` real seconds) over the real Binance websocket protocol
and REST on loopback (services/ingest/simulator).

Protocol with the parent, one JSON object per line:
- stdout ``{"ws_url", "rest_url", "open_times", "pid", "symbols"}`` once the server listens;
- stdin ``begin``: the replay starts once every stream has been subscribed (ingest connected);
- stdout ``{"closes": {open_time: [first_sent, last_sent]}, "stats": {...}}`` when the replay
  is done: wall-clock times (time.time()) at which the simulator began sending a candle's
  closing messages and finished sending them (the "exchange close" of a burst);
- stdin ``stop`` (or EOF): the server stops and the process exits.

In-progress updates: Binance sends a stream's kline every 2 s (the kline stream's "Update
Speed: 2000ms"); ``--updates`` per candle at the accelerated clock keeps that real-time rate
when it is ``--every / 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libs.common.klines import ws_stream_name  # noqa: E402
from services.ingest.simulator import ExchangeSimulator, load_candles, many_streams  # noqa: E402
from services.ingest.simulator.tape import TapeEvent  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "klines"
MINUTE_S = 60.0


class TimedSimulator(ExchangeSimulator):
    """Records when each candle's closing messages began and finished going out (around the
    websocket front's broadcast, which every replayed message goes through)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.closes: dict[int, list[float]] = {}
        send = self.websocket.broadcast

        async def timed(event: TapeEvent) -> None:
            if not event.closed:
                await send(event)
                return
            t = self.closes.setdefault(event.kline.open_time, [time.time(), 0.0])
            await send(event)
            t[1] = time.time()

        self.websocket.broadcast = timed  # type: ignore[method-assign]


def subscribed(sim: ExchangeSimulator) -> int:
    return len(sim.websocket.subscribed_streams())


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, required=True)
    ap.add_argument("--candles", type=int, required=True)
    ap.add_argument("--every", type=float, required=True, help="real seconds per 1m candle")
    ap.add_argument("--updates", type=int, required=True, help="in-progress updates per candle and stream")
    args = ap.parse_args()
    candles = many_streams(load_candles(sorted(DATA.glob("*-1m-*.csv.gz")), limit=args.candles), args.symbols)
    sim = TimedSimulator(candles, speed=MINUTE_S / args.every, updates_per_candle=args.updates)
    await sim.start(replay=False)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict) -> None:
        sys.stdout.write(orjson.dumps(obj).decode() + "\n")
        sys.stdout.flush()

    open_times = sorted({k.open_time for ks in candles.values() for k in ks})
    say({"ws_url": sim.ws_url, "rest_url": sim.rest_url, "open_times": open_times, "pid": os.getpid(),
         "symbols": [s for s, _ in candles]})
    streams = {ws_stream_name(s, i) for s, i in candles}
    try:
        while (line := (await reader.readline()).decode().strip()) not in ("", "stop"):
            if line == "begin":
                deadline = time.monotonic() + 300
                while subscribed(sim) < len(streams):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{subscribed(sim)} of {len(streams)} streams subscribed after 300 s")
                    await asyncio.sleep(0.05)
                sim.begin()
                await sim.wait_done()
                stats = {k: v for k, v in vars(sim.stats).items() if isinstance(v, int)}
                say({"closes": {str(t): v for t, v in sim.closes.items()}, "stats": stats})
    finally:
        await sim.stop()


if __name__ == "__main__":
    asyncio.run(main())
