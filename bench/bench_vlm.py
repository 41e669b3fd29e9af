"""VLM analyses: seconds per chart in process beside the same model behind llama-cpp-python's
OpenAI-compatible server (the remote layout), and the cost per generated token of the strict
grammar beside llama-cpp-python's own JSON-schema grammar, all in the same run on the same pair.

By default the tiny random-weight pair (``klinebus vlm tiny-model``): it measures the path's
overheads, not a 7B's speed; give ``--model``/``--mmproj`` for a real or 7B-shaped pair.

    .venv/bin/python bench/bench_vlm.py [--charts 8] [--threads 1] [--model M --mmproj P]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libs.common.klines import read_kline_csv  # noqa: E402
from libs.llm.grammar import schema_to_gbnf  # noqa: E402
from libs.llm.models import from_paths  # noqa: E402
from libs.llm.runtime import LocalModel, RemoteModel  # noqa: E402
from libs.llm.testing import ModelServer, TinyPair, write_tiny_qwen25vl  # noqa: E402
from services.vlm.analysis import PriceFrame, answer_schema  # noqa: E402
from services.vlm.analyst import Analyst  # noqa: E402
from services.vlm.image import load_chart_png  # noqa: E402
from tests.services.vlm.conftest import BTC_15M, chart_event, chart_png  # noqa: E402


async def per_chart(analyst: Analyst, jobs) -> list[float]:
    out = []
    for chart, frame, png in jobs:
        started = time.perf_counter()
        await analyst.analyse(chart, frame, png)
        out.append(time.perf_counter() - started)
    return out


def ms_per_token(llm, grammar, prompt: str, runs: int) -> float:
    per = []
    for seed in range(runs):
        started = time.perf_counter()
        out = llm.create_completion(prompt, grammar=grammar, max_tokens=400, temperature=1.0, seed=seed)
        n = out["usage"]["completion_tokens"]
        per.append((time.perf_counter() - started) * 1000 / max(n, 1))
    return statistics.median(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--charts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--image-max-side", type=int, default=448)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-vlm-"))
    pair = TinyPair(args.model, args.mmproj) if args.model else write_tiny_qwen25vl(tmp)
    candles = read_kline_csv(BTC_15M, "BTCUSDT", "15m")
    jobs = []
    for i in range(args.charts):
        last = 59 + 40 * i
        chart = chart_event(candles, last, "")
        shown = candles[last - 59 : last + 1]
        path = chart_png(tmp / f"chart-{i}.png", shown)
        png, _, _ = load_chart_png(str(path), args.image_max_side)
        jobs.append((chart, PriceFrame.of(shown), png))

    local = LocalModel(from_paths(pair.model, pair.mmproj), n_ctx=4096, n_threads=args.threads, warmup=False)
    local.load()
    t_local = asyncio.run(per_chart(Analyst(local, timeout_s=600), jobs))
    with ModelServer(pair, n_ctx=4096, threads=args.threads) as server:
        async def remote_run() -> list[float]:
            remote = RemoteModel(server.url)
            try:
                await remote.describe()
                return await per_chart(Analyst(remote, timeout_s=600), jobs)
            finally:
                await remote.close()

        t_remote = asyncio.run(remote_run())

    import llama_cpp

    schema = answer_schema(jobs[0][1])
    text = llama_cpp.Llama(model_path=str(pair.model), n_ctx=2048, n_threads=args.threads, verbose=False)
    strict = llama_cpp.LlamaGrammar.from_string(schema_to_gbnf(schema), verbose=False)
    loose_schema = json.loads(json.dumps(schema).replace('"x-decimals"', '"description"'))
    library = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(loose_schema), verbose=False)
    ms_strict = ms_per_token(text, strict, "Answer in JSON:", 5)
    ms_library = ms_per_token(text, library, "Answer in JSON:", 5)
    asyncio.run(local.close())
    text.close()
    shutil.rmtree(tmp, ignore_errors=True)

    p50 = statistics.median
    print(f"model {pair.model.name}, {args.charts} charts at <= {args.image_max_side} px, {args.threads} thread(s)")
    print(f"{'path':<36}{'p50 s/chart':>12}{'max':>9}{'ratio':>8}")
    print(f"{'in process (reference)':<36}{p50(t_local):>12.3f}{max(t_local):>9.3f}{1.0:>8.2f}")
    print(f"{'llama_cpp.server over HTTP':<36}{p50(t_remote):>12.3f}{max(t_remote):>9.3f}{p50(t_remote) / p50(t_local):>8.2f}")
    print(f"{'grammar':<36}{'ms/token':>12}{'':>9}{'ratio':>8}")
    print(f"{'llama-cpp-python from_json_schema':<36}{ms_library:>12.2f}{'':>9}{1.0:>8.2f}")
    print(f"{'strict bounded (libs/llm)':<36}{ms_strict:>12.2f}{'':>9}{ms_strict / ms_library:>8.2f}")


if __name__ == "__main__":
    main()
