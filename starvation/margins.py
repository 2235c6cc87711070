"""How far a 2-D classifier's decision boundary stays from points (the two-moons margin of Figures 1-3)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def boundary_distances(
    model: nn.Module, points: torch.Tensor, *, resolution: int = 400, padding: float = 0.5
) -> torch.Tensor:
    """Per point, the distance to the nearest zero crossing of the logit on a grid around the points.

    The logit is evaluated on a resolution x resolution grid spanning the points' bounding box plus `padding`;
    where it changes sign between neighbouring grid nodes the crossing is placed by linear interpolation.
    Returns +inf for every point when the boundary does not cross the grid.
    """
    model.eval()
    points = points.detach().float().cpu()
    low, high = points.min(dim=0).values - padding, points.max(dim=0).values + padding
    axes = [torch.linspace(float(low[d]), float(high[d]), resolution) for d in range(2)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [R, R, 2]
    model_device = next(model.parameters()).device
    logits = model(grid.reshape(-1, 2).to(model_device)).reshape(resolution, resolution).cpu()
    crossings = []
    for dim in (0, 1):
        a, b = logits.narrow(dim, 0, resolution - 1), logits.narrow(dim, 1, resolution - 1)
        pa, pb = grid.narrow(dim, 0, resolution - 1), grid.narrow(dim, 1, resolution - 1)
        change = (a > 0) != (b > 0)
        t = (a / (a - b))[change].unsqueeze(1)
        crossings.append(pa[change] + t * (pb[change] - pa[change]))
    boundary = torch.cat(crossings)
    if len(boundary) == 0:
        return torch.full((len(points),), float("inf"))
    return torch.cdist(points, boundary).min(dim=1).values
