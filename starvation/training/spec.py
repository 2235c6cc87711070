"""The train spec: defaults < preset < the caller's spec, validated; devices by name; the optimizer it names."""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from starvation import datasets
from starvation import params as P
from starvation.errors import SpecError
from starvation.methods import method_class
from starvation.networks import resolve_arch_params
from starvation.presets import PRESETS

MAX_SEED = 2**31 - 1

DEFAULTS: dict[str, Any] = {
    "preset": None,
    "dataset": None,  # required: from the spec or its preset
    "model": {"arch": "mlp", "hidden": [300, 300]},
    "method": {"name": "erm"},
    "optimizer": {"name": "adam", "lr": 1e-3},
    "steps": 1000,
    "batch_size": None,  # full batch, as the paper
    "seeds": [0],
    "eval_every": 50,
    "execution": "auto",  # "batched": all seeds as one stacked model; "sequential": one after another; see EXECUTIONS
    "precision": "fp32",  # of the training updates; see PRECISIONS
    "cuda_graphs": False,  # on a CUDA device: replay each update from a CUDA graph (`GraphedUpdates`)
    "device": "auto",  # for the worker's placement; `train` uses its `device` argument
    "audit": True,  # for the worker: audit each trained checkpoint
}
EXECUTIONS = {
    "auto": "batched for several seeds (where the architecture allows), otherwise sequential",
    "batched": "every seed in one stacked model (MLPs; other architectures run sequentially, and the result says why)",
    "sequential": "one seed after another (the reference)",
}
PRECISIONS = {  # evaluation (the metrics) always runs in IEEE float32
    "fp32": "IEEE float32 everywhere (TF32 off, cuDNN convolutions included)",
    "tf32": "TensorFloat-32 matmuls and convolutions in the training updates (CUDA only; the CPU stays float32)",
    "bf16": "bfloat16 autocast of the forward pass in the training updates; weights, optimizer and loss in float32",
}
SECTION_IDENTITY = {"dataset": "name", "model": "arch", "method": "name", "optimizer": "name"}

OPTIMIZERS: dict[str, dict[str, P.Param]] = {
    "adam": {
        "lr": P.Param(1e-3, "learning rate", P.positive),
        "betas": P.Param([0.9, 0.999], "Adam's (beta1, beta2)", P.list_of(P.probability, length=2)),
        "eps": P.Param(1e-8, "Adam's epsilon (it is why the CMNIST SD recipe's loss scale matters)", P.positive),
    },
    "sgd": {
        "lr": P.Param(1e-2, "learning rate", P.positive),
        "momentum": P.Param(0.0, "heavy-ball momentum", P.probability),
    },
}


# ---- the spec ------------------------------------------------------------------------------

def resolve_train_spec(spec: dict, *, user_datasets: Collection[str] = ()) -> dict:
    """The complete, validated train spec: defaults < preset < `spec`. Raises SpecError for a person.

    `user_datasets`: names besides the built-ins that `dataset.name` may take (registered datasets, no params).
    """
    if not isinstance(spec, dict):
        raise SpecError("the train spec must be a JSON object")
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise SpecError(f"unknown train spec field(s) {', '.join(map(repr, unknown))}; known: {', '.join(DEFAULTS)}")
    merged = copy.deepcopy(DEFAULTS)
    preset_name = spec.get("preset")
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise SpecError(f"unknown preset {preset_name!r}; presets: {', '.join(sorted(PRESETS))}")
        preset = {k: v for k, v in copy.deepcopy(PRESETS[preset_name]).items() if k != "source"}
        merged = _merge_spec(merged, preset)
    merged = _merge_spec(merged, copy.deepcopy(spec))

    if merged["dataset"] is None:
        raise SpecError("the train spec needs a dataset, e.g. {\"name\": \"colored_mnist\"}, or a preset")
    dataset = _resolve_dataset(merged["dataset"], user_datasets)
    num_classes = datasets.DATASETS[dataset["name"]].NUM_CLASSES if dataset["name"] in datasets.DATASETS else None
    return {
        "preset": preset_name,
        "dataset": dataset,
        "model": _resolve_model(merged["model"]),
        "method": _resolve_method(merged["method"], num_classes),
        "optimizer": _resolve_optimizer(merged["optimizer"]),
        "steps": _field("steps", P.positive_int, merged["steps"]),
        "batch_size": _field("batch_size", P.optional(P.positive_int), merged["batch_size"]),
        "seeds": _resolve_seeds(merged["seeds"]),
        "eval_every": _field("eval_every", P.positive_int, merged["eval_every"]),
        "execution": _field("execution", P.one_of(*EXECUTIONS), merged["execution"]),
        "precision": _field("precision", P.one_of(*PRECISIONS), merged["precision"]),
        "cuda_graphs": _field("cuda_graphs", P.boolean, merged["cuda_graphs"]),
        "device": _resolve_device_name(merged["device"]),
        "audit": _field("audit", P.boolean, merged["audit"]),
    }


def _merge_spec(base: dict, override: dict) -> dict:
    """Deep merge; a section whose name/arch changes is replaced, not merged (no stale hyper-parameters)."""
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        identity = SECTION_IDENTITY.get(key)
        same_kind = identity is None or (isinstance(value, dict) and isinstance(old, dict)
                                         and value.get(identity, old.get(identity)) == old.get(identity))
        merged[key] = _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) and same_kind else value
    return merged


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        merged[key] = _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def _field(name: str, check: Callable[[Any], Any], value: Any) -> Any:
    try:
        return check(value)
    except (ValueError, TypeError) as error:
        raise SpecError(f"{name} {error} (got {value!r})") from None


def _section(name: str, value: Any, identity: str) -> tuple[Any, dict]:
    if not isinstance(value, dict):
        raise SpecError(f"{name} must be an object with a {identity!r} field")
    rest = {k: v for k, v in value.items() if k != identity}
    return value.get(identity), rest


def _resolve_dataset(section: Any, user_datasets: Collection[str]) -> dict:
    name, rest = _section("dataset", section, "name")
    extra = sorted(set(rest) - {"params"})
    if extra:
        raise SpecError(f"dataset has unknown field(s) {', '.join(map(repr, extra))}; it takes name and params")
    params = rest.get("params") or {}
    if not isinstance(params, dict):
        raise SpecError("dataset.params must be an object")
    if name in datasets.DATASETS:
        return {"name": name, "params": datasets.resolve_params(name, params)}
    if isinstance(name, str) and name in user_datasets:
        if params:
            raise SpecError(f"dataset {name!r} is a registered dataset and takes no params")
        return {"name": name, "params": {}}
    raise SpecError(f"unknown dataset {name!r}; built-in datasets: {', '.join(sorted(datasets.DATASETS))}")


def _resolve_model(section: Any) -> dict:
    arch, params = _section("model", section, "arch")
    return {"arch": arch, **resolve_arch_params(arch, params)}


def _resolve_method(section: Any, num_classes: int | None) -> dict:
    name, params = _section("method", section, "name")
    resolved = {"name": name, **method_class(name)(params).params}
    _check_gamma(resolved, num_classes)
    return resolved


def _check_gamma(method: dict, num_classes: int | None) -> None:
    gamma = method.get("sd_gamma")
    if isinstance(gamma, list) and num_classes is not None and len(gamma) != num_classes:
        raise SpecError(f"method.sd_gamma has {len(gamma)} values; the dataset has {num_classes} classes "
                        "(give one per class, or a scalar)")


def _resolve_optimizer(section: Any) -> dict:
    name, params = _section("optimizer", section, "name")
    if name not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {name!r}; optimizers: {', '.join(sorted(OPTIMIZERS))}")
    if name == "adam" and params.get("momentum", 0.0) in (0, 0.0, None):
        params.pop("momentum", None)  # API.md's example carries momentum 0.0 for either optimizer
    return {"name": name, **P.resolve(f"optimizer {name!r}", OPTIMIZERS[name], params)}


def _resolve_seeds(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"seeds must be a non-empty list of integers (got {value!r})")
    seeds = [_field("each seed", P.non_negative_int, s) for s in value]
    if max(seeds) > MAX_SEED:
        raise SpecError(f"seeds must be at most {MAX_SEED}")
    if len(set(seeds)) != len(seeds):
        raise SpecError("seeds must be distinct: the same seed trains the same model")
    return seeds


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _resolve_device_name(value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise SpecError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {value!r})")
    return value


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'; SpecError when that device is not here."""
    name = _resolve_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SpecError(f"device {name!r} requested but this machine has no CUDA device")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SpecError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def build_optimizer(section: dict, parameters: Iterable[nn.Parameter], *,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """`capturable`: the optimizer's step may be captured in a CUDA graph (Adam keeps its step count on the GPU)."""
    parameters = list(parameters)
    if section["name"] == "adam":
        # On a GPU the fused Adam: one kernel per step for every tensor, the same update (its default there is a
        # multi-tensor loop of several kernels); on the CPU the default, so CPU results stay as they were.
        fused = bool(parameters) and parameters[0].is_cuda
        return torch.optim.Adam(parameters, lr=section["lr"], betas=tuple(section["betas"]), eps=section["eps"],
                                fused=fused, capturable=capturable)
    return torch.optim.SGD(parameters, lr=section["lr"], momentum=section["momentum"])
