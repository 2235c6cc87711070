"""The train spec: defaults < preset < the caller's spec, validated; devices by name; the optimizer it names."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from starvation import datasets
from starvation import params as P
from starvation.errors import SpecError
from starvation.methods import METHODS, method_class
from starvation.networks import ARCHS, arch_class, resolve_arch_params
from starvation.presets import PRESETS

MAX_SEED = 2**31 - 1
MAX_CUDA_INDEX = 63  # a bound any machine meets; the worker refuses an index it does not have
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:([0-9]|[1-5][0-9]|6[0-3]))$"  # cuda:0 .. cuda:{MAX_CUDA_INDEX}

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


@P.accepting({"type": "string", "pattern": DEVICE_PATTERN})
def _device_name(value: Any) -> str:
    if not isinstance(value, str) or not re.match(DEVICE_PATTERN, value):
        raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N' with N at most {MAX_CUDA_INDEX}")
    return value


@P.accepting(
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        "minItems": 1,
        "uniqueItems": True,
    }
)
def _seed_list(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of integers")
    seeds = P.list_of(P.int_between(0, MAX_SEED))(value)
    if len(set(seeds)) != len(seeds):
        raise ValueError("must be distinct: the same seed trains the same model")
    return seeds


@P.accepting({"type": "number", "minimum": 0, "maximum": 0.5})
def _holdout_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 0.5:
        raise ValueError("must be a number from 0 to 0.5")
    return float(value)


# The spec's plain fields; the four sections (dataset, model, method, optimizer) are declared by what they name.
FIELDS: dict[str, P.Param] = {
    "steps": P.Param(1000, "training updates", P.positive_int),
    "batch_size": P.Param(None, "examples per update; null: full batch, as in the paper", P.optional(P.positive_int)),
    "seeds": P.Param([0], "one model per seed; each seed also redraws a built-in dataset's noise", _seed_list),
    "eval_every": P.Param(50, "evaluate (metrics) every this many steps", P.positive_int),
    "execution": P.Param("auto", "; ".join(f"{k}: {v}" for k, v in EXECUTIONS.items()), P.one_of(*EXECUTIONS)),
    "precision": P.Param(
        "fp32",
        "of the training updates; " + "; ".join(f"{k}: {v}" for k, v in PRECISIONS.items()),
        P.one_of(*PRECISIONS),
    ),
    "cuda_graphs": P.Param(
        False, "on a CUDA device, replay each update from a CUDA graph (fewer launches; ignored on a CPU)", P.boolean
    ),
    "compile": P.Param(
        False,
        "batched execution: the stacked update's forward pass and loss, and their backward, "
        "under torch.compile, compiled once per phase of the loss before training starts "
        "(timing.compile_s); sequential execution ignores it",
        P.boolean,
    ),
    "save_every": P.Param(
        None,
        "save a resumable state (weights, optimizer, step, minibatch order) every this many "
        "steps, so that a run after a lost worker resumes there instead of at step 0 "
        "(sequential execution: one seed at a time); null: never",
        P.optional(P.positive_int),
    ),
    "ntk_every": P.Param(
        None,
        "record the empirical NTK's centred alignments with the label, the attribute and the "
        "core feature (metrics ntk_alignment_label, _attribute, _core; split train) on a fixed "
        "group-balanced sample of 256 training examples, at every evaluation whose step is a "
        "multiple of this (and the last); null: never",
        P.optional(P.positive_int),
    ),
    "holdout": P.Param(
        0.0,
        "fraction of each training split held out as a split named 'holdout' (evaluated, never "
        "trained on; the same rows for every seed); a sweep's train_domain_validation chooses on "
        "it",
        _holdout_fraction,
    ),
    "device": P.Param("auto", "where the worker trains: auto (CUDA when present), cpu, cuda or cuda:N", _device_name),
    "audit": P.Param(True, "audit each trained checkpoint for reliance on the dataset's spurious attribute", P.boolean),
}
SECTIONS = {"dataset": "name", "model": "arch", "method": "name", "optimizer": "name"}  # section: what it names
DEFAULTS: dict[str, Any] = {
    "preset": None,
    "dataset": None,  # required: from the spec or its preset
    "model": {"arch": "mlp"},
    "method": {"name": "erm"},
    "optimizer": {"name": "adam"},
    **{name: param.default for name, param in FIELDS.items()},
}

OPTIMIZER_DESCRIPTIONS = {"adam": "torch.optim.Adam (fused on a GPU)", "sgd": "torch.optim.SGD, heavy-ball momentum"}
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


def resolve_train_spec(spec: dict, *, user_datasets: Collection[str] = ()) -> dict[str, Any]:
    """The complete, validated train spec in its JSON form (what a job stores; `ResolvedTrainSpec.of` reads it):
    defaults < preset < `spec`. Raises SpecError for a person.

    `user_datasets`: names besides the built-ins that `dataset.name` may take (registered datasets, no params).
    Nothing in `spec` or the presets is changed: every merge and check builds new dicts and lists.
    """
    if not isinstance(spec, dict):
        raise SpecError("the train spec must be a JSON object")
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise SpecError(f"unknown train spec field(s) {', '.join(map(repr, unknown))}; known: {', '.join(DEFAULTS)}")
    merged = DEFAULTS
    preset_name = spec.get("preset")
    if preset_name is not None:
        if not isinstance(preset_name, str) or preset_name not in PRESETS:
            raise SpecError(f"unknown preset {preset_name!r}; presets: {', '.join(sorted(PRESETS))}")
        merged = _merge_spec(merged, {k: v for k, v in PRESETS[preset_name].items() if k != "source"})
    merged = _merge_spec(merged, spec)
    fields = {name: _field(name, param.check, merged[name]) for name, param in FIELDS.items()}
    if merged["dataset"] is None:
        raise SpecError('the train spec needs a dataset, e.g. {"name": "colored_mnist"}, or a preset')
    dataset = _resolve_dataset(merged["dataset"], user_datasets)
    num_classes = datasets.DATASETS[dataset["name"]].NUM_CLASSES if dataset["name"] in datasets.DATASETS else None
    model = _resolve_model(merged["model"])
    if fields["batch_size"] == 1 and arch_class(model["arch"]).BATCH_NORM:
        raise P.ParamError(
            f"arch {model['arch']!r} normalises over the batch (BatchNorm): batch_size must be at least 2", "batch_size"
        )
    return {
        "preset": preset_name,
        "dataset": dataset,
        "model": model,
        "method": _resolve_method(merged["method"], num_classes),
        "optimizer": _resolve_optimizer(merged["optimizer"]),
        **fields,
    }


def _merge_spec(base: dict, override: dict) -> dict:
    """Deep merge; a section whose name/arch changes is replaced, not merged (no stale hyper-parameters)."""
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        identity = SECTIONS.get(key)
        same_kind = identity is None or (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get(identity, old.get(identity)) == old.get(identity)
        )
        merged[key] = (
            _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) and same_kind else value
        )
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
    named = value.get(identity)
    if named is not None and not isinstance(named, str):  # a list or object is no name (and not hashable)
        raise P.ParamError(f"{name}.{identity} must be a string (got {named!r})", f"{name}.{identity}")
    return named, rest


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
    check_gamma(resolved, num_classes)
    return resolved


def check_gamma(method: Mapping[str, Any], num_classes: int | None) -> None:
    """A per-class sd_gamma of the `method` section (or its params) has one value per class of the dataset."""
    gamma = method.get("sd_gamma")
    if isinstance(gamma, list) and num_classes is not None and len(gamma) != num_classes:
        raise SpecError(
            f"method.sd_gamma has {len(gamma)} values; the dataset has {num_classes} classes "
            "(give one per class, or a scalar)"
        )


def _resolve_optimizer(section: Any) -> dict:
    name, params = _section("optimizer", section, "name")
    if name not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {name!r}; optimizers: {', '.join(sorted(OPTIMIZERS))}")
    if name == "adam" and params.get("momentum", 0.0) in (0, 0.0, None):
        params.pop("momentum", None)  # API.md's example carries momentum 0.0 for either optimizer (ADAM_MOMENTUM)
    return {"name": name, **P.resolve(f"optimizer {name!r}", OPTIMIZERS[name], params)}


def _resolve_device_name(value: Any) -> str:
    return _field("device", _device_name, value)


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


def build_optimizer(
    section: dict, parameters: Iterable[nn.Parameter], *, capturable: bool = False
) -> torch.optim.Optimizer:
    """`capturable`: the optimizer's step may be captured in a CUDA graph (Adam keeps its step count on the GPU)."""
    parameters = list(parameters)
    if section["name"] == "adam":
        # On a GPU the fused Adam: one kernel per step for every tensor, the same update (its default there is a
        # multi-tensor loop of several kernels); on the CPU the default, so CPU results stay as they were.
        fused = bool(parameters) and parameters[0].is_cuda
        return torch.optim.Adam(
            parameters,
            lr=section["lr"],
            betas=tuple(section["betas"]),
            eps=section["eps"],
            fused=fused,
            capturable=capturable,
        )
    return torch.optim.SGD(parameters, lr=section["lr"], momentum=section["momentum"])


# ---- the spec's JSON Schema (the API's document is made from it) --------------------------------

ADAM_MOMENTUM = {
    "const": 0,
    "description": "accepted and dropped (API.md's example shows it for either optimizer); Adam's momentum is betas[0]",
}


def section_schemas() -> dict[str, dict]:
    """JSON Schema of each section, one variant per thing it can name (the variant's defaults are the engine's).

    The name may be left out to change parameters of what the preset (or the default) names.
    """

    def variants(
        identity: str,
        things: dict[str, tuple[str, dict[str, P.Param]]],
        kind: str,
        extra: dict[str, dict[str, dict]] | None = None,
    ) -> dict:
        return {
            "anyOf": [
                P.object_schema(
                    f"{name} ({kind})",
                    declared,
                    description=description,
                    extra={identity: {"const": name}, **(extra or {}).get(name, {})},
                )
                for name, (description, declared) in things.items()
            ]
        }

    builtin = {name: (cls.DESCRIPTION, cls.PARAMS) for name, cls in datasets.DATASETS.items()}
    dataset = {
        "anyOf": [
            {
                "title": f"{name} (dataset)",
                "type": "object",
                "description": description,
                "required": ["name"],
                "properties": {"name": {"const": name}, "params": P.object_schema(f"{name} params", declared)},
                "additionalProperties": False,
            }
            for name, (description, declared) in builtin.items()
        ]
        + [
            {
                "title": "registered dataset",
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "description": "a dataset you registered (POST /v1/datasets), by id; it takes no params",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 200},
                    "params": {"type": "object", "maxProperties": 0},
                },
            }
        ]
    }
    return {
        "dataset": dataset,
        "model": variants("arch", {n: (c.DESCRIPTION, c.PARAMS) for n, c in ARCHS.items()}, "model"),
        "method": variants("name", {n: (c.DESCRIPTION, c.PARAMS) for n, c in METHODS.items()}, "method"),
        "optimizer": variants(
            "name",
            {n: (OPTIMIZER_DESCRIPTIONS[n], d) for n, d in OPTIMIZERS.items()},
            "optimizer",
            extra={"adam": {"momentum": ADAM_MOMENTUM}},
        ),
    }


def field_schemas() -> dict[str, dict]:
    """JSON Schema of every train spec field, with the default a job runs with when neither it nor a preset sets it."""
    sections = section_schemas()
    for section in SECTIONS:
        if DEFAULTS[section] is not None:
            sections[section]["default"] = DEFAULTS[section]
    preset = {
        "anyOf": [{"enum": sorted(PRESETS)}, {"type": "null"}],
        "default": None,
        "description": "one of the paper's recipes (GET /v1/presets); the fields given here override it",
    }
    return {"preset": preset, **sections, **{name: param.json_schema() for name, param in FIELDS.items()}}
