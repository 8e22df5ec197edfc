import pytest
import torch
from sklearn.datasets import load_digits


@pytest.fixture(scope="session")
def digits() -> dict[str, torch.Tensor]:
    """A seeded split of sklearn's 8x8 digits: 600 training and 400 test images, 64
    standardised features, 10 classes (chance accuracy 0.1)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:600], perm[600:1000]
    return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return (probs.argmax(dim=-1) == y).float().mean().item()
