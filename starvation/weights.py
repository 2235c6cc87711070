"""Weights from elsewhere: torchvision's state-dict names to ours (`torchvision_state_dict_to_ours`), and a network
filled from a state dict, the backbone strictly and the head where it fits (`load_initial_weights`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from starvation.errors import SpecError
from starvation.networks import Network


def torchvision_state_dict_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` under our `Network`'s names: torchvision's `fc.*` becomes `head.*`, every other key not already
    ours (`features.*`, `head.*`) becomes `features.<key>` (`conv1.weight` -> `features.conv1.weight`). Keys that
    are ours stay as they are; two keys landing on one name are a SpecError."""
    renamed: dict[str, torch.Tensor] = {}
    given: dict[str, str] = {}
    for key, tensor in state_dict.items():
        if key.startswith(("features.", "head.")):
            ours = key
        elif key.startswith("fc."):
            ours = "head." + key[len("fc.") :]
        else:
            ours = "features." + key
        if ours in renamed:
            raise SpecError(f"the weights hold both {given[ours]!r} and {key!r}, which are the same tensor {ours!r}")
        renamed[ours], given[ours] = tensor, key
    return renamed


def load_initial_weights(network: Network, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Fill `network` (in place) from `state_dict`, with torchvision's names or ours: the backbone strictly, the
    head where it fits.

    Every `features` tensor must be there with the network's shape (a BatchNorm's `num_batches_tracked` may be
    missing: it is then left as it is) and no key may be unknown, else a SpecError naming the first bad key as
    given. The head (`fc`/`head`) is loaded only when both its tensors are there with the network's shapes;
    otherwise the fresh head stays (fine-tuning a 1000-class ImageNet net to one logit).
    Returns {"names": "torchvision" | "ours", "loaded": tensors loaded, "head": "loaded" | "fresh",
    "skipped": the keys (as given) left out}.
    """
    renamed = torchvision_state_dict_to_ours(state_dict)
    given = dict(zip(renamed, state_dict))  # our name -> the key as given (dicts keep their order)
    expected = network.state_dict()
    for key in renamed:
        if key not in expected:
            raise SpecError(f"the weights hold {given[key]!r} ({key!r}), which the network does not have")
    backbone = {key: tensor for key, tensor in renamed.items() if not key.startswith("head.")}
    for key, tensor in expected.items():
        if key.startswith("head."):
            continue
        if key not in backbone:
            if key.endswith(".num_batches_tracked"):
                continue
            raise SpecError(f"the weights lack {key!r} (torchvision: {key.removeprefix('features.')!r})")
        if tuple(backbone[key].shape) != tuple(tensor.shape):
            raise SpecError(
                f"the weights' {given[key]!r} has shape {list(backbone[key].shape)}; the network's "
                f"{key!r} has {list(tensor.shape)}"
            )
    head_keys = [key for key in expected if key.startswith("head.")]
    head_fits = all(key in renamed and tuple(renamed[key].shape) == tuple(expected[key].shape) for key in head_keys)
    loaded = {**backbone, **({key: renamed[key] for key in head_keys} if head_fits else {})}
    with torch.no_grad():
        network.load_state_dict(loaded, strict=False)
    torchvision_named = any(not key.startswith(("features.", "head.")) for key in state_dict)
    return {
        "names": "torchvision" if torchvision_named else "ours",
        "loaded": len(loaded),
        "head": "loaded" if head_fits else "fresh",
        "skipped": [given[key] for key in renamed if key not in loaded],
    }
