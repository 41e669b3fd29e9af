"""The seeds' shapes in torch and the shared training loop (seeds, early stopping, LR decay, device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from services.trainer.loop import LoopConfig, fit, pick_device
from services.trainer.models import SEED_CONFIGS, BiLSTMOHLC, LSTMClose, ServingGraph, WeightedMSE


def test_bilstm_has_the_seed_shapes():
    m = BiLSTMOHLC(13)
    assert (m.lstm1.input_size, m.lstm1.hidden_size, m.lstm1.bidirectional) == (13, 128, True)
    assert (m.lstm2.input_size, m.lstm2.hidden_size) == (256, 64)
    assert (m.lstm3.input_size, m.lstm3.hidden_size) == (128, 32)
    assert m.drop.p == 0.2
    assert [layer.out_features for layer in m.dense if isinstance(layer, nn.Linear)] == [64, 32]
    assert len(m.heads) == 4 and all(h.out_features == 1 for h in m.heads)
    assert m(torch.zeros(5, 60, 13)).shape == (5, 1, 4)
    cfg = SEED_CONFIGS["bilstm-ohlc"]
    assert (cfg["lr"], cfg["batch_size"], cfg["epochs"], cfg["patience"], cfg["lr_factor"], cfg["lr_patience"]) == (
        1e-3, 32, 100, 15, 0.5, 5)
    assert cfg["loss_weights"] == {"open": 1.0, "close": 1.0, "high": 0.8, "low": 0.8}


def test_lstm_close_has_the_seed_shapes():
    m = LSTMClose(44)
    assert (m.lstm.hidden_size, m.lstm.num_layers, m.lstm.dropout) == (64, 2, 0.3)
    assert m(torch.zeros(3, 60, 44)).shape == (3, 7, 1)
    cfg = SEED_CONFIGS["lstm-close"]
    assert (cfg["lr"], cfg["batch_size"], cfg["epochs"]) == (5e-3, 64, 150)


def test_weighted_mse():
    loss = WeightedMSE([1.0, 1.0, 0.8, 0.8])
    pred = torch.zeros(1, 1, 4)
    target = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])
    assert float(loss(pred, target)) == pytest.approx((1 + 1 + 0.8 + 0.8) / 4)


def test_serving_graph_decodes_prices():
    class Const(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 1, 1), 2.0)  # scaled target

    # scaled 2.0 -> log return 2.0 * 0.01 + 0.0 -> price = last close * e^0.02
    g = ServingGraph(Const(), [0.0, 0.0], [1.0, 1.0], [0.0], [0.01], close_index=1)
    x = torch.tensor([[[5.0, 100.0], [6.0, 200.0]]], dtype=torch.float64)
    assert float(g(x)[0, 0, 0]) == pytest.approx(200.0 * np.exp(0.02))


def _toy(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(256, 4)).astype(np.float32))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])
    return x, y


def _batches(x, y, bs=32):
    def train(rng):
        order = rng.permutation(len(x))
        for i in range(0, len(x), bs):
            idx = order[i : i + bs]
            yield x[idx], y[idx]

    return train, (lambda: [(x, y)])


def test_loop_learns_and_is_reproducible():
    x, y = _toy()
    train, val = _batches(x, y)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        res = fit(model, train, val, nn.MSELoss(), LoopConfig(epochs=30, lr=0.05, patience=30, seed=7, device="cpu"))
        runs.append((model.weight.detach().clone(), res))
    (w1, r1), (w2, r2) = runs
    assert torch.equal(w1, w2)
    assert r1.history[-1].val_loss < r1.history[0].val_loss / 10
    assert r1.device == "cpu" and r1.amp is False and r1.train_samples_per_s > 0


def test_early_stopping_restores_the_best_weights():
    x, y = _toy()
    train, _ = _batches(x, y)
    noise = torch.randn_like(y)  # validation targets the model cannot learn: it stops improving early
    seen = []
    model = nn.Linear(4, 1)
    res = fit(model, train, lambda: [(x, noise)], nn.MSELoss(),
              LoopConfig(epochs=200, lr=0.05, patience=4, lr_patience=2, seed=0, device="cpu"), on_epoch=seen.append)
    assert res.stopped == "early-stopping" and res.epochs_run < 200
    assert res.epochs_run == res.best_epoch + 4
    assert [e.epoch for e in seen] == list(range(1, res.epochs_run + 1))
    with torch.no_grad():
        assert float(nn.functional.mse_loss(model(x), noise)) == pytest.approx(res.best_val_loss, rel=1e-5)
    assert min(e.lr for e in seen) < 0.05  # the plateau halved the learning rate on the way


def test_stop_flag_and_device_choice():
    x, y = _toy()
    train, val = _batches(x, y)
    res = fit(nn.Linear(4, 1), train, val, nn.MSELoss(), LoopConfig(epochs=50, device="cpu"), should_stop=lambda: True)
    assert res.stopped == "asked" and res.epochs_run == 1
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixed_precision_trains():
    x, y = _toy()
    train, val = _batches(x, y)
    model = BiLSTMOHLC(4)
    xs = x.reshape(256, 1, 4).repeat(1, 10, 1)
    ys = y.reshape(256, 1, 1).repeat(1, 1, 4)
    train, val = _batches(xs, ys)
    res = fit(model, train, val, WeightedMSE([1, 1, 0.8, 0.8]), LoopConfig(epochs=3, device="cuda"))
    assert res.device.startswith("cuda") and res.amp and np.isfinite(res.best_val_loss)
