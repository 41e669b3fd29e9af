"""Rendering in a process pool: one prepared renderer per worker and preset.

Matplotlib is single-threaded and holds the GIL while drawing, so parallel
charts need processes. Each worker keeps its prepared figures for its whole
life; a window (a few KB of arrays) goes in, PNG bytes come out.

The renderer is ``DirectRenderer`` (Agg calls replayed, ~2x ``FastRenderer``) for the text-free
presets it supports (``classifier224``), ``FastRenderer`` otherwise; both draw the pixels plain
mplfinance draws, so which one ran never shows in a chart.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Iterable, Iterator

from libs.common.cpus import available_cpus
from libs.charting.direct import DirectRenderer, UnsupportedChart, supports
from libs.charting.fast import FastRenderer
from libs.charting.presets import ChartPreset
from libs.charting.window import ChartWindow

_renderers: dict[ChartPreset, DirectRenderer | FastRenderer] = {}


def renderer_for(preset: ChartPreset) -> DirectRenderer | FastRenderer:
    """The fastest renderer that draws ``preset`` (same pixels either way)."""
    return DirectRenderer(preset) if supports(preset) else FastRenderer(preset)


def render_in_worker(w: ChartWindow, preset: ChartPreset) -> bytes:
    """Render with this process's renderer for ``preset`` (prepared on first use)."""
    r = _renderers.get(preset)
    if r is None:
        r = _renderers[preset] = renderer_for(preset)
    try:
        return r.render(w)
    except UnsupportedChart:
        # the figure made a draw call the direct path does not replay: the artist path draws it
        r.close()
        r = _renderers[preset] = FastRenderer(preset)
        return r.render(w)


def _render_to_file(w: ChartWindow, preset: ChartPreset, path: str) -> str:
    data = render_in_worker(w, preset)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


class RenderPool:
    """``submit(window, preset) -> Future[bytes]``; ``workers=0`` renders in this process; ``None``:
    one per CPU this process may use (its cgroup's quota in a pod, not the node's core count, which
    would start a render process per node core)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = int(available_cpus()) if workers is None else workers
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor | None:
        # spawn, not fork: a forked child would inherit the parent's event loop and Redis sockets
        return ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) if self.workers > 0 else None

    def restart(self) -> None:
        """Replace the worker processes. A worker that died (OOM-killed, crashed) breaks its whole
        executor for good: every later submit raises ``BrokenProcessPool`` until it is replaced."""
        old, self._pool = self._pool, self._new_pool()
        if old is not None:
            old.shutdown(wait=True, cancel_futures=True)

    def submit(self, w: ChartWindow, preset: ChartPreset) -> Future:
        if self._pool is None:
            fut: Future = Future()
            try:
                fut.set_result(render_in_worker(w, preset))
            except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
                fut.set_exception(exc)
            return fut
        return self._pool.submit(render_in_worker, w, preset)

    def render_files(self, jobs: Iterable[tuple[ChartWindow, ChartPreset, str]], chunksize: int = 32) -> Iterator[str]:
        """Render each (window, preset, path) to its file, yielding paths as they finish (in order)."""
        jobs = list(jobs)
        if self._pool is None:
            for w, p, path in jobs:
                yield _render_to_file(w, p, path)
            return
        yield from self._pool.map(_render_to_file, *zip(*jobs), chunksize=chunksize) if jobs else iter(())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "RenderPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
