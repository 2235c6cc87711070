"""An ERM model built by hand, outside the project's training code, to repair.

`ErmMlp` is `features` (flatten, two ReLU layers) then a linear `head`: the layout the audit
reads a TorchScript feature layer from. Trained full batch with Adam on the pooled training
environments of Colored MNIST, it leans on the colour (colour-swap flip rate above 0.7) while
its hidden layer still holds the digit.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

ERM_HIDDEN = 128
ERM_STEPS = 60  # long enough to lean on colour, short of memorising the training digits


class ErmMlp(nn.Module):
    def __init__(self, hidden: int = ERM_HIDDEN, num_outputs: int = 1, input_size: int = 2 * 14 * 14) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(input_size, hidden), nn.ReLU(),
                                      nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_erm(x: torch.Tensor, y: torch.Tensor, *, steps: int = ERM_STEPS, seed: int = 0, hidden: int = ERM_HIDDEN,
              lr: float = 1e-3) -> ErmMlp:
    """Plain full-batch ERM: binary cross-entropy on one logit, Adam, no regulariser."""
    torch.manual_seed(seed)
    model = ErmMlp(hidden, input_size=int(x[0].numel()))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    target = y.float()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], target)
        loss.backward()
        optimizer.step()
    return model.eval()


@functools.lru_cache(maxsize=2)
def erm_colored_mnist(seed: int = 0) -> ErmMlp:
    """ERM on the training environments of the default colored_mnist (dataset seed 0)."""
    from starvation import datasets

    train = datasets.build("colored_mnist", {}, seed=0, data_dir=None).train_data()
    return train_erm(train.x, train.y, seed=seed)
