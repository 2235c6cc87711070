"""The empirical neural tangent kernel (NTK) of a network's logit, and what it says about starvation.

The paper's argument lives in the NTK picture: the kernel K(x, x') = <df(x)/dθ, df(x')/dθ> decides which directions
of the data gradient descent learns first; a kernel aligned with the spurious attribute learns it and starves
the rest. Here: K on a group-balanced sample, its spectrum, its centred alignment (Cortes, Mohri and Rostamizadeh
2012) with the label, the attribute and the core feature, and the share of the top eigenvectors' mass each
(label, attribute) group carries. Gradients come from `torch.func` (per-example gradients, vmapped), a few
parameter tensors at a time so that the per-example gradients held at once stay within `memory_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

MAX_EXAMPLES = 1_024
TOP_K = 10  # eigenvectors whose mass is shared out over groups; eigenvalues shown
SHOWN_EIGENVALUES = 32
EXAMPLES_PER_PASS = 128
GROUP_BYTES = 256 << 20  # per-example gradients held at once, unless one parameter tensor's alone are more


def scalar_logit(out: torch.Tensor) -> torch.Tensor:
    """The one logit of a binary model per example: itself ([N] or [N, 1]), or the difference of two ([N, 2])."""
    if out.dim() == 1:
        return out
    if out.shape[-1] == 1:
        return out[..., 0]
    if out.shape[-1] == 2:
        return out[..., 1] - out[..., 0]
    raise ValueError("the NTK probe reads one logit: binary models only")


def ntk_gram(module: nn.Module, x: torch.Tensor, *, memory_bytes: int = GROUP_BYTES) -> torch.Tensor:
    """K[i, j] = <d f(x_i) / dθ, d f(x_j) / dθ> over every trainable parameter θ of `module` (in eval mode), in
    float64 on the CPU. f is the module's binary logit (`scalar_logit`)."""
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in module.named_buffers()}
    n = len(x)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for group in _parameter_groups(params, n, memory_bytes):
        fixed = {name: p for name, p in params.items() if name not in group}

        def logit(
            trainable: dict[str, torch.Tensor], example: torch.Tensor, fixed: dict[str, torch.Tensor] = fixed
        ) -> torch.Tensor:
            out = functional_call(module, ({**fixed, **trainable}, buffers), (example.unsqueeze(0),))
            return scalar_logit(out).squeeze(0)

        per_example_grad = vmap(grad(logit), in_dims=(None, 0))
        trainable = {name: params[name] for name in group}
        flat = torch.empty(n, sum(params[name].numel() for name in group))  # filled a chunk of examples at a time
        start = 0
        for chunk in x.split(EXAMPLES_PER_PASS):  # a chunk's activations, not the sample's, are held at once
            grads = per_example_grad(trainable, chunk)
            column = 0
            for name in group:
                size = params[name].numel()
                flat[start : start + len(chunk), column : column + size] = grads[name].reshape(len(chunk), -1)
                column += size
            start += len(chunk)
        gram += (flat @ flat.T).double()
    return gram


def kernel_bytes(n: int, *, parameters: int, largest_tensor: int, input_values: int, activations: int) -> int:
    """What `ntk_gram` on `n` examples holds at its peak (float32 bytes, from above), for a network of `parameters`
    values whose largest tensor holds `largest_tensor`, with `input_values` per input and `activations` kept per
    example: one group's per-example gradients and a pass's copy of them, a pass's activations (x3, as training's),
    the sample's inputs, and the Gram matrix in float64 with a temporary."""
    chunk = min(n, EXAMPLES_PER_PASS)
    group = min(n * parameters * 4, max(GROUP_BYTES, n * largest_tensor * 4))
    return group + group * chunk // n + 3 * chunk * activations * 4 + n * input_values * 4 + 2 * n * n * 8


def _parameter_groups(params: dict[str, torch.Tensor], n: int, memory_bytes: int) -> list[list[str]]:
    """Parameter names in groups whose per-example gradients (n x their size, float32) fit `memory_bytes`; a
    tensor larger than that alone is a group of its own."""
    groups: list[list[str]] = [[]]
    held = 0
    for name, p in params.items():
        size = n * p.numel() * 4
        if groups[-1] and held + size > memory_bytes:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    return [g for g in groups if g]


def centred_alignment(gram: torch.Tensor, target: torch.Tensor) -> float | None:
    """Cortes et al. (2012)'s centred alignment of `gram` with the kernel of a class target (one-hot Y, Y Y^T):
    <Kc, Yc>_F / (||Kc||_F ||Yc||_F), Kc = H K H, H = I - 1 1^T / n. None when either centred kernel is zero."""
    values = torch.unique(target)
    onehot = (target.unsqueeze(1) == values.unsqueeze(0)).double()
    centred_k, centred_y = _centre(gram.double()), _centre(onehot @ onehot.T)
    norm = float(torch.linalg.matrix_norm(centred_k) * torch.linalg.matrix_norm(centred_y))
    if norm == 0.0:
        return None
    return float((centred_k * centred_y).sum()) / norm


def _centre(kernel: torch.Tensor) -> torch.Tensor:
    return kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True) + kernel.mean()


def balanced_sample(
    y: torch.Tensor, attribute: torch.Tensor, *, seed: int, max_examples: int = MAX_EXAMPLES
) -> np.ndarray:
    """Indices of an equal number of examples from each (label, attribute) group present, at most
    `max_examples` in all, sorted."""
    labels, attributes = y.numpy(), attribute.numpy()
    members = [
        np.flatnonzero((labels == a) & (attributes == b)) for a in np.unique(labels) for b in np.unique(attributes)
    ]
    members = [m for m in members if len(m)]
    per_group = min(min(len(m) for m in members), max_examples // len(members))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(m, size=per_group, replace=False) for m in members]))


def kernel_report(gram: torch.Tensor, *, y: torch.Tensor, attribute: torch.Tensor, core: torch.Tensor | None) -> dict:
    """Spectrum, alignments and the groups' shares of the top eigenvectors' mass."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)
    trace = float(eigenvalues.sum())
    top = min(TOP_K, len(eigenvalues))
    mass = (eigenvectors[:, :top] ** 2).sum(1)  # each unit vector's mass, summed over the top ones: `top` in all
    groups = {}
    for a in torch.unique(y).tolist():
        for b in torch.unique(attribute).tolist():
            member = (y == a) & (attribute == b)
            if member.any():
                groups[f"label={a},attribute={b}"] = {
                    "top_mass_share": float(mass[member].sum()) / top,
                    "sample_share": float(member.double().mean()),
                }
    shown = eigenvalues[:SHOWN_EIGENVALUES]
    return {
        "eigenvalues": [float(v) for v in shown],
        "eigenvalue_trace_shares": [float(v) / trace if trace > 0 else 0.0 for v in shown],
        "trace_share_top10": float(eigenvalues[:10].sum()) / trace if trace > 0 else 0.0,
        "alignment": {
            "label": centred_alignment(gram, y),
            "attribute": centred_alignment(gram, attribute),
            "core": centred_alignment(gram, core) if core is not None else None,
        },
        "top_eigenvector_mass": {"k": top, "groups": groups},
    }


TRAINING_EXAMPLES = 256  # the sample a train job's `ntk_every` follows: small, since it is computed at many steps


@dataclass(frozen=True)
class KernelSample:
    """A fixed group-balanced sample of the training data, and the variables the kernel is aligned with."""

    indices: torch.Tensor  # rows of the training data, sorted
    x: torch.Tensor
    targets: dict[str, torch.Tensor]  # label, attribute and (where the dataset has it) core

    @classmethod
    def of(cls, train, *, seed: int, max_examples: int = TRAINING_EXAMPLES) -> KernelSample:
        chosen = torch.from_numpy(balanced_sample(train.y, train.attribute, seed=seed, max_examples=max_examples))
        targets = {"label": train.y[chosen], "attribute": train.attribute[chosen]}
        if train.core_label is not None:
            targets["core"] = train.core_label[chosen]
        return cls(indices=chosen, x=train.x[chosen], targets=targets)

    def alignments(self, module: nn.Module) -> dict[str, float]:
        """{target: centred alignment} of `module`'s kernel on the sample (a target whose alignment is undefined is
        left out)."""
        was_training = module.training
        module.eval()
        try:
            gram = ntk_gram(module, self.x.to(next(module.parameters()).device)).cpu()
        finally:
            module.train(was_training)
        found = {name: centred_alignment(gram, target) for name, target in self.targets.items()}
        return {name: value for name, value in found.items() if value is not None}
