"""The micro-batcher's session calls: a full batch starts in ``submit`` (before the caller gives
the loop back), up to ``calls`` batches run side by side in their own threads, and answers are
still handed on in the jobs' order whichever call finishes first."""

from __future__ import annotations

import threading

import numpy as np

from services.inference.batching import Job, MicroBatcher
from tests.services.inference.harness import until

WAIT_S = 10.0  # generous: only reached when the behaviour under test is missing



def job(t: int) -> Job:
    return Job(None, "BTCUSDT", "15m", t, np.full(2, float(t)), 1.0)


async def test_a_full_batch_starts_in_the_model_thread_before_the_caller_gives_the_loop_back():
    started = threading.Event()
    got: list[int] = []

    def run(jobs):
        started.set()
        return [j.open_time for j in jobs]

    async def on_result(j, res) -> None:
        got.append(res)

    b = MicroBatcher("batcher:m", on_result, max_batch=4, max_wait_s=60.0, run=run)
    b.start()
    for t in range(4):
        b.submit(job(t))
    # Still inside this coroutine, no await since the submits: the session call has begun anyway
    # (a 60 s max_wait_s rules out the timer starting it).
    assert started.wait(WAIT_S)
    await until(lambda: len(got) == 4)
    await b.stop()
    assert got == [0, 1, 2, 3]


async def test_two_calls_run_side_by_side_and_answers_keep_the_jobs_order():
    both_running = threading.Barrier(2, timeout=WAIT_S)
    second_done = threading.Event()
    got: list[int] = []

    def run(jobs):
        both_running.wait()  # breaks (and fails the test) unless two calls are in flight at once
        if jobs[0].open_time == 0:
            assert second_done.wait(WAIT_S)  # the first batch finishes last
        else:
            second_done.set()
        return [j.open_time * 10 for j in jobs]

    async def on_result(j, res) -> None:
        got.append(res)

    b = MicroBatcher("batcher:m", on_result, max_batch=2, max_wait_s=60.0, run=run, calls=2)
    b.start()
    for t in range(4):
        b.submit(job(t))
    await until(lambda: len(got) == 4)
    assert b.pending == 0
    await b.stop()
    assert got == [0, 10, 20, 30]


async def test_one_call_at_a_time_by_default():
    running, most = 0, 0
    lock = threading.Lock()
    got: list[int] = []

    def run(jobs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return [j.open_time for j in jobs]
        finally:
            with lock:
                running -= 1

    async def on_result(j, res) -> None:
        got.append(res)

    b = MicroBatcher("batcher:m", on_result, max_batch=1, max_wait_s=60.0, run=run)
    b.start()
    for t in range(20):
        b.submit(job(t))
    await until(lambda: len(got) == 20)
    await b.stop()
    assert got == list(range(20)) and most == 1


async def test_a_partial_batch_starts_after_max_wait():
    got: list[int] = []

    async def on_result(j, res) -> None:
        got.append(res)

    b = MicroBatcher("batcher:m", on_result, max_batch=64, max_wait_s=0.01, run=lambda jobs: [j.open_time for j in jobs])
    b.start()
    b.submit(job(7))
    assert b.pending == 1
    await until(lambda: got == [7])
    await b.stop()
