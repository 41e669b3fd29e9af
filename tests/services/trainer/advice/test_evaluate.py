"""The evaluation harness: hand-made answers for its bookkeeping, the real tiny GGUF model through
llama-cpp-python for the real path, and a real subprocess killed mid-run for the resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from libs.common.errors import CliError
from services.trainer.advice import evaluate as E
from services.trainer.advice import prompt as P

REPO = Path(__file__).resolve().parents[4]
DECIMAL = re.compile(r"^-?(0|[1-9][0-9]{0,11})(\.[0-9]{1,8})?$")


class Scripted:
    """Answers from a rule over the item's context; stops (like Ctrl-C) after ``stop_after`` calls."""

    def __init__(self, rule, fingerprint="f1", stop_after=None):
        self.name, self.fingerprint = "scripted.gguf", fingerprint
        self.rule, self.stop_after, self.calls, self.seen = rule, stop_after, 0, []

    def answer(self, messages):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.seen.append(messages)
        return self.rule(messages[-1]["content"])


def sell_if_last_change_negative(prompt: str) -> str:
    context = json.loads(prompt.partition("### Input:")[2])
    last = context["open_changes"][-1]
    return P.answer_text(last, "SELL" if last.startswith("-") else "BUY")


def test_the_model_sees_the_seed_three_shots_then_the_item(small_dataset):
    model = Scripted(sell_if_last_change_negative)
    E.evaluate(model, small_dataset, limit=3, results=small_dataset.parent / "shots.jsonl")
    messages = model.seen[0]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert messages[5]["content"] == '{"predicted_open_change":"-0.00002200","advice":"SELL"}'
    verify = pd.read_parquet(small_dataset / "verify.parquet")
    assert messages[-1]["content"] in set(verify["prompt"])


def test_interrupted_run_resumes_to_the_same_scorecard(small_dataset, tmp_path):
    whole = E.evaluate(Scripted(sell_if_last_change_negative), small_dataset, results=tmp_path / "whole.jsonl")
    path = tmp_path / "parts.jsonl"
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(Scripted(sell_if_last_change_negative, stop_after=40), small_dataset, results=path)
    assert len(path.read_text().splitlines()) == 1 + 40
    second = Scripted(sell_if_last_change_negative)
    resumed = E.evaluate(second, small_dataset, results=path)
    assert resumed.resumed == 40 and second.calls == whole.card["n"] - 40
    for key in ("accuracy", "correct", "confusion", "mae"):
        assert resumed.card["model"][key] == whole.card["model"][key]
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == whole.card["n"]


def test_a_half_written_last_line_is_asked_again(small_dataset, tmp_path):
    path = tmp_path / "r.jsonl"
    E.evaluate(Scripted(sell_if_last_change_negative), small_dataset, limit=5, results=path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # killed while writing item 5
    again = Scripted(sell_if_last_change_negative)
    result = E.evaluate(again, small_dataset, limit=5, results=path)
    assert again.calls == 1 and result.card["n"] == 5
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_header_cut_off_mid_write_starts_the_file_again(small_dataset, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"journal": {"journal_ver')
    result = E.evaluate(Scripted(sell_if_last_change_negative), small_dataset, limit=2, results=path)
    assert result.answered_now == 2 and len(path.read_text().splitlines()) == 3


def test_answers_of_another_model_are_never_mixed_in(small_dataset, tmp_path):
    path = tmp_path / "r.jsonl"
    E.evaluate(Scripted(sell_if_last_change_negative, fingerprint="a"), small_dataset, limit=2, results=path)
    with pytest.raises(CliError, match="model_fingerprint"):
        E.evaluate(Scripted(sell_if_last_change_negative, fingerprint="b"), small_dataset, limit=2, results=path)
    fresh = E.evaluate(Scripted(sell_if_last_change_negative, fingerprint="b"), small_dataset, limit=2,
                       results=path, restart=True)
    assert fresh.resumed == 0 and fresh.answered_now == 2


def test_unparseable_answers_count_as_wrong_with_their_reason(small_dataset, tmp_path):
    rule = iter(['{"predicted_open_change":"abc","advice":"BUY"}', "not json"] + ['{"predicted_open_change":"0.1","advice":"NOOP"}'] * 8)
    result = E.evaluate(Scripted(lambda _p: next(rule)), small_dataset, limit=10, results=tmp_path / "r.jsonl")
    model = result.card["model"]
    assert model["invalid"] == 2 and model["mae_n"] == 8
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()[1:]]
    assert "not a decimal number" in recs[0]["error"] and "not valid JSON" in recs[1]["error"]


def test_limit_spreads_items_over_the_whole_split(small_dataset):
    verify = pd.read_parquet(small_dataset / "verify.parquet")
    picked = E.select_items(verify, 10)
    assert len(picked) == 10 and picked["id"].is_unique
    span = verify["open_time"].max() - verify["open_time"].min()
    assert picked["open_time"].max() - picked["open_time"].min() > 0.8 * span
    assert picked["id"].tolist() == E.select_items(verify, 10)["id"].tolist()


def test_tiny_gguf_end_to_end_through_llama_cpp(small_dataset, tiny_gguf, tmp_path):
    from services.trainer.advice.llama import LlamaAdviceModel

    model = LlamaAdviceModel.local(tiny_gguf, n_threads=1)
    try:
        result = E.evaluate(model, small_dataset, limit=6, results=tmp_path / "tiny.jsonl")
    finally:
        model.close()
    card = result.card
    assert card["n"] == 6 and card["model"]["invalid"] == 0  # the grammar holds even a random model
    recs = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()[1:]]
    for rec in recs:
        raw = json.loads(rec["raw"])
        assert list(raw) == ["predicted_open_change", "advice"]
        assert raw["advice"] in ("BUY", "NOOP", "SELL") and DECIMAL.match(raw["predicted_open_change"])
        assert rec["seconds"] > 0
    assert set(card["baselines"]) == {"random", "majority", "last_minute"}
    assert (tmp_path / "tiny.scorecard.json").exists()


def test_a_timed_out_call_is_that_items_wrong_answer(small_dataset, tiny_gguf, tmp_path):
    from services.trainer.advice.llama import LlamaAdviceModel

    model = LlamaAdviceModel.local(tiny_gguf, n_threads=1, timeout_s=1e-6)
    try:
        result = E.evaluate(model, small_dataset, limit=2, results=tmp_path / "t.jsonl")
    finally:
        model.close()
    assert result.card["model"]["invalid"] == 2
    rec = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[1])
    assert "CallTimeout" in rec["raw"]


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    from services.trainer.advice.llama import LlamaAdviceModel

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(CliError, match="not a GGUF file"):
        LlamaAdviceModel.local(bad)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.trainer.advice", *args]


@pytest.mark.slow
def test_killed_subprocess_resumes_where_it_stopped(small_dataset, tiny_gguf, tmp_path):
    results = tmp_path / "kill.jsonl"
    total = 30
    cmd = _cli("evaluate", "--model", str(tiny_gguf), "--dataset", str(small_dataset), "--limit", str(total),
               "--results", str(results), "--n-threads", "1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    answered = 0
    while time.monotonic() < deadline:
        answered = len(results.read_text().splitlines()) - 1 if results.exists() else 0
        if answered >= 5 or proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()  # still running: the kill lands mid-run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = [json.loads(line)["id"] for line in results.read_text().splitlines()[1:] if line.endswith("}")]
    assert 5 <= len(before) < total

    done = subprocess.run(cmd + ["--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    card = json.loads(done.stdout)
    assert card["n"] == total
    ids = [json.loads(line)["id"] for line in results.read_text().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == total
    assert ids[: len(before)] == before  # earlier answers kept, not asked again
    assert re.search(r"advice \d+/\d+ items, [\d.]+ items/s, ETA \d+m\d\ds", done.stderr)


def test_cli_errors_are_one_line(small_dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(_cli("evaluate", "--model", str(tmp_path / "none.gguf"), "--dataset", str(small_dataset)),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"klinebus: error: model file {tmp_path / 'none.gguf'} does not exist"]


def test_the_klinebus_commands_reach_the_advice_experiment(tmp_path, tiny_gguf, capsys):
    from klinebus.cli import main

    from .conftest import BTC_1M

    out = tmp_path / "ds"
    assert main(["dataset", "build", "--kind", "advice", "--input", str(BTC_1M), "--train-range", "2026-04-15..2026-04-15T02:00",
                 "--verify-range", "2026-04-15T02:00..2026-04-15T03:00", "--set", "threshold=0.0005", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["threshold"] == 0.0005 and manifest["rows"]["verify"] == 60 - 11
    capsys.readouterr()
    assert main(["evaluate", "advice", "--model", str(tiny_gguf), "--dataset", str(out), "--limit", "3",
                 "--n-threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    assert main(["train", "--dataset", str(out), "--registry", str(tmp_path / "reg")]) == 2  # not an ONNX kind
    assert "klinebus train --kind advice-orpo" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["train", "--kind", "advice-orpo", "--dataset", str(out), "--out", str(tmp_path / "o")]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_an_openai_compatible_server_answers_under_the_grammar(small_dataset, tiny_pair, tmp_path, capsys):
    pytest.importorskip("uvicorn", reason="llama-cpp-python's server extra is not installed")
    from libs.llm.testing import ModelServer

    from services.trainer.advice.cli import main

    with ModelServer(tiny_pair, n_ctx=4096) as server:  # the byte-level 3-shot prompt is ~2.6k tokens
        assert main(["evaluate", "--server", server.url, "--dataset", str(small_dataset), "--limit", "3",
                     "--results", str(tmp_path / "remote.jsonl"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["n"] == 3 and card["model"]["invalid"] == 0
    assert card["model"]["label"] == tiny_pair.model.name  # the name the server reports
    port_now_closed = server.url
    assert main(["evaluate", "--server", port_now_closed, "--dataset", str(small_dataset)]) == 2
    assert "unreachable" in capsys.readouterr().err


def test_the_standalone_dataset_command(tmp_path, capsys):
    from services.trainer.advice.cli import main

    from .conftest import BTC_1M

    assert main(["dataset-build", "--input", str(BTC_1M), "--train-range", "2026-04-15..2026-04-15T01:00",
                 "--verify-range", "2026-04-15T01:00..2026-04-15T02:00", "--out", str(tmp_path / "ds")]) == 0
    assert "no trade counts in the source of BTCUSDT" in capsys.readouterr().out
    assert main(["dataset-build", "--input", str(BTC_1M), "--train-range", "2026-04-15..2026-04-15T01:00",
                 "--out", str(tmp_path / "ds2")]) == 2
    assert capsys.readouterr().err.strip() == (
        "klinebus: error: the advice dataset needs --train-range and --verify-range (START..END, UTC, end excluded)")
