"""One training loop for every torch model the trainer builds (the forecasters here, the chart
classifier in services/trainer/classifier): Adam, LR decay on a validation plateau, early stopping
with the best weights restored, device chosen automatically (CUDA with mixed precision when present,
CPU otherwise), fixed seeds, a progress callback per batch and per epoch, and a stop flag.

A batch is ``(inputs, target)``; ``inputs`` is a tensor or a tuple of tensors passed to
``model(*inputs)``. Batches come from callables, so any data source plugs in::

    result = fit(model, train_batches=lambda rng: ..., val_batches=lambda: ..., loss_fn=nn.MSELoss(),
                 config=LoopConfig(epochs=20, lr=1e-3, patience=5))
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from libs.common.cpus import available_cpus


class JobInterrupted(RuntimeError):
    """Training was asked to stop (service shutdown) before it finished; nothing may be published."""


Batch = tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]


@dataclass
class LoopConfig:
    epochs: int = 100
    lr: float = 1e-3
    patience: int = 15  # epochs without a better validation loss before stopping
    lr_factor: float = 0.5
    lr_patience: int = 5
    min_delta: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool | None = None  # None: on for CUDA, off on CPU
    max_batches: int | None = None  # per epoch; for smoke runs and tests
    grad_clip: float | None = 1.0
    # CPU intra-op threads (None: the CPUs this process may use, its cgroup quota in a pod). Small recurrent batches gain little from
    # more, and on a shared machine OpenMP threads waiting on each other made a 2-thread LSTM step
    # 35x slower than a 1-thread one: the forecasters' jobs ask for 1 (TrainOptions.threads).
    threads: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    seconds: float
    samples: int
    best: bool


@dataclass
class FitResult:
    device: str
    amp: bool
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped: str  # "early-stopping" | "max-epochs" | "asked"
    history: list[EpochLog] = field(default_factory=list)

    @property
    def train_samples_per_s(self) -> float:
        s = sum(h.seconds for h in self.history)
        return sum(h.samples for h in self.history) / s if s > 0 else float("nan")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked but no CUDA device is available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _to(inputs, device):
    if isinstance(inputs, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in inputs)
    return (inputs.to(device, non_blocking=True),)


def evaluate_loss(model: nn.Module, batches: Iterable[Batch], loss_fn: nn.Module, device: torch.device, amp: bool) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, enabled=amp):
        for inputs, target in batches:
            ins = _to(inputs, device)
            out = model(*ins)
            loss = loss_fn(out.float(), target.to(device))
            total += float(loss) * len(target)
            n += len(target)
    return total / n if n else float("nan")


def fit(
    model: nn.Module,
    train_batches: Callable[[np.random.Generator], Iterable[Batch]],
    val_batches: Callable[[], Iterable[Batch]],
    loss_fn: nn.Module,
    config: LoopConfig,
    on_epoch: Callable[[EpochLog], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the weights of its best validation epoch."""
    seed_everything(config.seed)
    device = pick_device(config.device)
    if device.type == "cpu":
        # None: one per CPU this process may use (torch's own default counts the node's cores,
        # far past a pod's CPU limit, where the extra threads only wait on each other)
        torch.set_num_threads(config.threads or max(1, int(available_cpus())))
    amp = config.amp if config.amp is not None else device.type == "cuda"
    model.to(device)
    loss_fn.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=config.lr_factor, patience=config.lr_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    rng = np.random.default_rng(config.seed)
    best = math.inf
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, since_best = 0, 0
    history: list[EpochLog] = []
    stopped = "max-epochs"
    for epoch in range(1, config.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total, n = 0.0, 0
        for b, (inputs, target) in enumerate(train_batches(rng)):
            if config.max_batches is not None and b >= config.max_batches:
                break
            ins, target = _to(inputs, device), target.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                out = model(*ins)
            loss = loss_fn(out.float(), target)
            scaler.scale(loss).backward()
            if config.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * len(target)
            n += len(target)
            if on_batch is not None:
                on_batch(epoch, b + 1)
            if should_stop is not None and should_stop():
                break
        val = evaluate_loss(model, val_batches(), loss_fn, device, amp)
        seconds = time.perf_counter() - t0
        sched.step(val)
        improved = val < best - config.min_delta
        if improved:
            best, best_epoch, since_best = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        log = EpochLog(epoch, total / n if n else float("nan"), val, opt.param_groups[0]["lr"], seconds, n, improved)
        history.append(log)
        if on_epoch is not None:
            on_epoch(log)
        if should_stop is not None and should_stop():
            stopped = "asked"
            break
        if since_best >= config.patience:
            stopped = "early-stopping"
            break
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(str(device), amp, best_epoch, best, len(history), stopped, history)
