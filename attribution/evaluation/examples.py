"""The embedded example task: an MLP on scikit-learn's digits (real data shipped with scikit-learn).

Used by the README's main job (scripts/digits_demo.py) and the LDS benchmark (scripts/lds.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def load_digits_split(seed: int = 0, n_test: int = 297) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((x_train [n, 64], y_train), (x_test, y_test)), pixels scaled to [0, 1], a seeded split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def train_mlp(model: nn.Module, x: Tensor, y: Tensor, epochs: int = 40, lr: float = 3e-3, batch: int = 64,
              seed: int = 0, weight_decay: float = 1e-4) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def per_sample_loss(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def margin(model: nn.Module, batch) -> Tensor:
    """TRAK's model-output function for classification: log(p / (1 - p)) of the correct class."""
    x, y = batch
    logits = model(x)
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]
