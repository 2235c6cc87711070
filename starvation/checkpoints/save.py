"""Trained models to files and back: safetensors weights (plus a built-in arch) and self-contained TorchScript."""

from __future__ import annotations

import contextlib
import copy
import json
import pathlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file
from torch import nn

from starvation.errors import SpecError
from starvation.networks import arch_class, build_network
from starvation.weights import torchvision_state_dict_to_ours


@dataclass
class CheckpointFile:
    """The two files one trained seed leaves, and what it takes to rebuild the network from the weights."""

    seed: int
    safetensors_path: pathlib.Path
    torchscript_path: pathlib.Path
    arch: str
    arch_params: dict
    input_shape: list[int]
    num_outputs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "safetensors_path": str(self.safetensors_path),
            "torchscript_path": str(self.torchscript_path),
        }


def save_checkpoint(
    model: nn.Module,
    out_dir: pathlib.Path,
    *,
    seed: int,
    arch: str,
    arch_params: dict,
    input_shape: Sequence[int],
    num_outputs: int,
) -> CheckpointFile:
    """`seed{S}.safetensors` and `seed{S}.torchscript.pt` under out_dir."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = CheckpointFile(
        seed=seed,
        safetensors_path=out_dir / f"seed{seed}.safetensors",
        torchscript_path=out_dir / f"seed{seed}.torchscript.pt",
        arch=arch,
        arch_params=dict(arch_params),
        input_shape=[int(d) for d in input_shape],
        num_outputs=int(num_outputs),
    )
    cpu_model = copy.deepcopy(model).cpu().eval()
    metadata = {
        "arch": arch,
        "arch_params": json.dumps(checkpoint.arch_params),
        "input_shape": json.dumps(checkpoint.input_shape),
        "num_outputs": str(num_outputs),
    }
    save_file(
        {k: v.contiguous() for k, v in cpu_model.state_dict().items()},
        str(checkpoint.safetensors_path),
        metadata=metadata,
    )
    with _quiet_jit():
        torch.jit.save(_script(cpu_model, checkpoint.input_shape), str(checkpoint.torchscript_path))
    return checkpoint


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is deprecated in recent torch but is the self-contained format the API promises."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        yield


def _script(model: nn.Module, input_shape: list[int]) -> torch.jit.ScriptModule:
    try:
        return torch.jit.script(model)
    except Exception:
        return torch.jit.trace(model, torch.zeros(1, *input_shape))


def load_builtin(
    path_safetensors: str | pathlib.Path | bytes,
    arch: str,
    arch_params: dict | None,
    input_shape: Sequence[int],
    num_outputs: int,
) -> nn.Module:
    """A built-in network with weights from a safetensors file (or its bytes), in eval mode on the CPU.

    Every tensor must be there with its shape, the head's included. For archs that take torchvision's names
    (resnet18, resnet50) the keys may be torchvision's (`conv1.weight`, `layer1.0.bn1.running_mean`, `fc.weight`)
    as well as ours (`torchvision_state_dict_to_ours`).
    """
    try:
        if isinstance(path_safetensors, bytes):
            state = load(path_safetensors)
        else:
            state = load_file(str(path_safetensors))
    except (OSError, SafetensorError) as error:
        raise SpecError(f"not a readable safetensors file ({error})") from None
    model = build_network(arch, arch_params, input_shape, num_outputs)
    if arch_class(arch).TORCHVISION_NAMES:
        state = torchvision_state_dict_to_ours(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise SpecError(
            f"the weights do not fit arch {arch!r} with {arch_params} for input {list(input_shape)} and "
            f"{num_outputs} output(s): {' '.join(line.strip() for line in first[:3])}"
        ) from None
    return model.eval()


def load_torchscript(path: str | pathlib.Path) -> torch.jit.ScriptModule:
    """A TorchScript model on the CPU, in eval mode."""
    try:
        with _quiet_jit():
            return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as error:
        raise SpecError(f"not a loadable TorchScript file ({error})") from None
