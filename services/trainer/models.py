"""The seeds' forecasters in torch, with their shapes, and the serving graph that wraps them for export.

Both cores map scaled feature windows ``[batch, lookback, features]`` (float32) to scaled targets
``[batch, horizons, targets]``. ``ServingGraph`` puts the train-only scalers and the return-to-price
decoding around a core, so the exported ONNX file takes raw feature values (float64, as the features
service computes them) and answers prices.
"""

from __future__ import annotations

import torch
from torch import nn


class BiLSTMOHLC(nn.Module):
    """Seed 002 (Hybrid BiLSTM v7): BiLSTM 128 -> 64 -> 32 (dropout 0.2 after each), dense 64 -> 32
    (ReLU), four one-unit heads (open, close, high, low)."""

    def __init__(self, n_features: int, horizons: int = 1, targets: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.horizons, self.targets = horizons, targets
        self.lstm1 = nn.LSTM(n_features, 128, batch_first=True, bidirectional=True)
        self.lstm2 = nn.LSTM(256, 64, batch_first=True, bidirectional=True)
        self.lstm3 = nn.LSTM(128, 32, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        # One head per target price, as the seed has (Dense 1 each); each covers every horizon.
        self.heads = nn.ModuleList(nn.Linear(32, horizons) for _ in range(targets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(x)
        h, _ = self.lstm2(self.drop(h))
        _, (h_n, _) = self.lstm3(self.drop(h))
        # Keras' Bidirectional(return_sequences=False): the forward pass's last state beside the
        # backward pass's last state (which has read the window from its end to its start).
        last = torch.cat([h_n[-2], h_n[-1]], dim=1)
        z = self.dense(self.drop(last))
        return torch.stack([head(z) for head in self.heads], dim=2)  # [batch, horizons, targets]


class LSTMClose(nn.Module):
    """Seed 004 (MOP LSTM v1): hidden 64, 2 layers, dropout 0.3, a linear layer to every step's close."""

    def __init__(self, n_features: int, horizons: int = 7, targets: int = 1, hidden: int = 64,
                 layers: int = 2, dropout: float = 0.3) -> None:
        super().__init__()
        self.horizons, self.targets = horizons, targets
        self.lstm = nn.LSTM(n_features, hidden, num_layers=layers, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, horizons * targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(self.drop(out[:, -1, :])).view(-1, self.horizons, self.targets)


# kind -> (constructor, training hyper-parameters from its seed)
SEED_CONFIGS: dict[str, dict] = {
    "bilstm-ohlc": dict(
        model="BiLSTMOHLC", lr=1e-3, batch_size=32, epochs=100, patience=15, lr_factor=0.5, lr_patience=5,
        loss_weights={"open": 1.0, "close": 1.0, "high": 0.8, "low": 0.8},
    ),
    "lstm-close": dict(
        model="LSTMClose", lr=5e-3, batch_size=64, epochs=150, patience=15, lr_factor=0.5, lr_patience=5,
        loss_weights={"close": 1.0},
    ),
}


def build_core(kind: str, n_features: int, horizons: int, targets: int) -> nn.Module:
    if kind == "bilstm-ohlc":
        return BiLSTMOHLC(n_features, horizons, targets)
    if kind == "lstm-close":
        return LSTMClose(n_features, horizons, targets)
    raise ValueError(f"no torch model for kind {kind!r}")


class WeightedMSE(nn.Module):
    """MSE with one weight per target (seed 002: 1.0 for open/close, 0.8 for high/low)."""

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("w", torch.tensor(weights, dtype=torch.float32))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (((pred - target) ** 2) * self.w).mean()


class ServingGraph(nn.Module):
    """Raw features ``[batch, lookback, F]`` float64 -> prices ``[batch, horizons, targets]`` float64."""

    def __init__(self, core: nn.Module, x_center, x_scale, y_center, y_scale, close_index: int) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("x_center", torch.as_tensor(x_center, dtype=torch.float64))
        self.register_buffer("x_scale", torch.as_tensor(x_scale, dtype=torch.float64))
        self.register_buffer("y_center", torch.as_tensor(y_center, dtype=torch.float64))
        self.register_buffer("y_scale", torch.as_tensor(y_scale, dtype=torch.float64))
        self.close_index = close_index

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = ((features - self.x_center) / self.x_scale).to(torch.float32)
        y = self.core(z).to(torch.float64)
        b, h, t = y.shape
        log_ret = y.reshape(b, h * t) * self.y_scale + self.y_center
        last_close = features[:, -1, self.close_index].unsqueeze(1)
        return (last_close * torch.exp(log_ret)).reshape(b, h, t)
