"""Loaded by the fault harness's service processes only (their PYTHONPATH starts here): SIGUSR1
prints the stack of every asyncio task to stderr (the process's log), so a test that finds a
service stuck can say where each of its tasks waits."""

import signal
import sys


def _dump_tasks(signum, frame) -> None:
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    tasks = asyncio.all_tasks(loop)
    print(f"--- {len(tasks)} asyncio tasks (SIGUSR1)", file=sys.stderr, flush=True)
    for task in tasks:
        print(f"task {task.get_name()}:", file=sys.stderr)
        # the whole await chain (Task.print_stack shows only the task's own coroutine)
        coro, depth = task.get_coro(), 0
        while coro is not None and depth < 40:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                print(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}", file=sys.stderr)
            nxt = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
            if nxt is None and coro is not None and not frame:
                print(f"  awaiting {coro!r}"[:300], file=sys.stderr)
            coro, depth = nxt, depth + 1
    print("--- end of tasks", file=sys.stderr, flush=True)


signal.signal(signal.SIGUSR1, _dump_tasks)
