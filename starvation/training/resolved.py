"""The resolved train spec read by attribute: `ResolvedTrainSpec`, a typed, frozen view of the JSON form that
`resolve_train_spec` makes and a job stores; and what in one likely does not do what its author meant."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from starvation.training.spec import FIELDS


@dataclass(frozen=True)
class DatasetSection:
    name: str  # a built-in's name, or a registered dataset's id
    params: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": copy.deepcopy(dict(self.params))}


@dataclass(frozen=True)
class ModelSection:
    arch: str
    params: Mapping[str, Any]  # every parameter of the architecture, defaults filled in

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **copy.deepcopy(dict(self.params))}


@dataclass(frozen=True)
class NamedSection:
    """The method or the optimizer: its name and every parameter, defaults filled in."""

    name: str
    params: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """{"name": ..., **params}: what `build_method` and `build_optimizer` take."""
        return {"name": self.name, **copy.deepcopy(dict(self.params))}


@dataclass(frozen=True)
class ResolvedTrainSpec:
    """A train spec that `resolve_train_spec` made (complete and checked), read by attribute: `train` runs it as it is.

    `of` makes one from the resolved JSON form (what a job stores; the worker runs it without resolving it again),
    and `to_dict` gives that form back.
    """

    preset: str | None
    dataset: DatasetSection
    model: ModelSection
    method: NamedSection
    optimizer: NamedSection
    steps: int
    batch_size: int | None
    seeds: tuple[int, ...]
    eval_every: int
    execution: str
    precision: str
    cuda_graphs: bool
    compile: bool
    save_every: int | None
    ntk_every: int | None
    holdout: float
    device: str
    audit: bool

    @classmethod
    def of(cls, resolved: Mapping[str, Any]) -> ResolvedTrainSpec:
        """The view of a resolved spec's JSON form; keys that are not train spec fields (a job's service fields, a
        sweep's grid) are left out, and a field a job stored before it existed takes its default."""
        plain = {name: resolved.get(name, param.default) for name, param in FIELDS.items()}
        plain["seeds"] = tuple(plain["seeds"])
        return cls(
            preset=resolved.get("preset"),
            dataset=DatasetSection(resolved["dataset"]["name"], MappingProxyType(dict(resolved["dataset"]["params"]))),
            model=ModelSection(resolved["model"]["arch"], MappingProxyType(_without(resolved["model"], "arch"))),
            method=NamedSection(resolved["method"]["name"], MappingProxyType(_without(resolved["method"], "name"))),
            optimizer=NamedSection(
                resolved["optimizer"]["name"], MappingProxyType(_without(resolved["optimizer"], "name"))
            ),
            **plain,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`resolve_train_spec`'s): what a job stores."""
        return {
            "preset": self.preset,
            "dataset": self.dataset.to_dict(),
            "model": self.model.to_dict(),
            "method": self.method.to_dict(),
            "optimizer": self.optimizer.to_dict(),
            **{name: list(self.seeds) if name == "seeds" else getattr(self, name) for name in FIELDS},
        }

    def replace(self, **changes: Any) -> ResolvedTrainSpec:
        """This spec with some fields changed (a sweep's one seed, an identification run's method and steps);
        not checked again. A `method` may be given as its JSON form, {"name": ..., **params}."""
        method = changes.get("method")
        if isinstance(method, Mapping):
            changes["method"] = NamedSection(method["name"], MappingProxyType(_without(method, "name")))
        if "seeds" in changes:
            changes["seeds"] = tuple(changes["seeds"])
        return dataclasses.replace(self, **changes)


def _without(section: Mapping[str, Any], identity: str) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != identity}


def resolved_view(spec: ResolvedTrainSpec | Mapping[str, Any]) -> ResolvedTrainSpec:
    """`spec` as a view: a resolved spec's JSON form (a stored job's) is taken as it is, without checking it again."""
    return spec if isinstance(spec, ResolvedTrainSpec) else ResolvedTrainSpec.of(spec)


def spec_warnings(resolved: ResolvedTrainSpec | Mapping[str, Any]) -> list[str]:
    """What in a valid, resolved spec (or its JSON form, a stored job's) will likely not do what its author meant;
    said, not refused."""
    spec = resolved_view(resolved)
    warnings = []
    for name in ("warmup_steps", "penalty_anneal_steps"):  # SD's, IRM's: steps before the method's terms apply
        warmup = spec.method.params.get(name) or 0
        if warmup and spec.steps <= warmup:
            warnings.append(
                f"steps ({spec.steps}) do not pass method.{name} ({warmup}): the run ends inside the "
                f"warm-up, so {spec.method.name}'s own terms never apply"
            )
    if spec.save_every and spec.execution != "sequential" and len(spec.seeds) > 1:
        warnings.append(
            "save_every saves seeds trained one at a time; if these seeds train batched (an MLP, "
            "execution auto), a run after a lost worker starts again at step 0 (set execution: "
            "sequential to resume)"
        )
    return warnings
