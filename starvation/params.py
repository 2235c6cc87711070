"""Declared hyper-parameters: a default, a one-line description and a check, in one place.

Datasets, networks, methods and optimizers each declare a `PARAMS` dict of `Param`; `resolve`
fills defaults, rejects unknown names and normalises values, raising `SpecError` for a person. Every check
carries the JSON Schema of what it accepts (`schema_of`), so the API's document is derived from the same
declarations the engine validates with (`Param.json_schema`, `object_schema`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starvation.errors import SpecError

Check = Callable[[Any], Any]  # returns the normalised value or raises ValueError("must be ...")


@dataclass(frozen=True)
class Param:
    default: Any
    description: str
    check: Check

    def json_schema(self) -> dict:
        return {**schema_of(self.check), "default": self.default, "description": self.description}


def schema_of(check: Check) -> dict:
    """The JSON Schema of the values `check` accepts (a copy: callers may add to it)."""
    return copy.deepcopy(getattr(check, "json_schema", {}))


def accepting(schema: dict) -> Callable[[Check], Check]:
    """Decorates a check with the JSON Schema of what it accepts."""

    def attach(check: Check) -> Check:
        check.json_schema = schema  # type: ignore[attr-defined]
        return check

    return attach


def object_schema(
    title: str,
    declared: Mapping[str, Param],
    *,
    description: str | None = None,
    extra: Mapping[str, dict] | None = None,
) -> dict:
    """A closed JSON object of `declared` (each with its default and description), plus `extra` properties."""
    schema: dict[str, Any] = {
        "title": title,
        "type": "object",
        "properties": {**(extra or {}), **{n: p.json_schema() for n, p in declared.items()}},
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


class ParamError(SpecError):
    """A bad parameter; `field` names it where the caller said where the parameters sit (e.g. "model.hidden")."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def resolve(
    owner: str, declared: Mapping[str, Param], given: Mapping[str, Any] | None, *, field: str | None = None
) -> dict:
    """`given` checked against `declared`, with defaults filled in (a new dict).

    `field`: where these parameters sit in the spec or form ("model", "dataset.params"); messages then name
    the parameter as `field.name`, and the `ParamError` carries that path.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        where = f"{field}.{unknown[0]}" if field else None
        raise ParamError(f"{owner} has no parameter {', '.join(map(repr, unknown))} (known: {known})", where)
    resolved = {}
    for name, param in declared.items():
        value = given.get(name, param.default)
        try:
            resolved[name] = param.check(value)
        except (ValueError, TypeError) as error:
            if field:
                raise ParamError(f"{field}.{name} {error} (got {value!r}; {owner})", f"{field}.{name}") from None
            raise ParamError(f"{owner}: parameter {name!r} {error} (got {value!r})") from None
    return resolved


def describe(declared: Mapping[str, Param]) -> dict:
    """JSON-able {name: {"default", "description"}} for listings."""
    return {name: {"default": p.default, "description": p.description} for name, p in declared.items()}


# ---- checks -------------------------------------------------------------------------------


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("must be a finite number")
    return float(value)


@accepting({"type": "number"})
def number(value: Any) -> float:
    return _number(value)


@accepting({"type": "number", "minimum": 0})
def non_negative(value: Any) -> float:
    value = _number(value)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


@accepting({"type": "number", "exclusiveMinimum": 0})
def positive(value: Any) -> float:
    value = _number(value)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


@accepting({"type": "number", "minimum": 0, "maximum": 1})
def probability(value: Any) -> float:
    value = _number(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a probability in [0, 1]")
    return value


@accepting({"type": "integer", "minimum": 1})
def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive integer")
    return int(value)


def int_between(low: int, high: int) -> Check:
    """An integer in [low, high]: every size a user sets has an explicit upper bound."""

    def checked(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an integer from {low} to {high}")
        return int(value)

    return accepting({"type": "integer", "minimum": low, "maximum": high})(checked)


@accepting({"type": "integer", "minimum": 0})
def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be an integer >= 0")
    return int(value)


@accepting({"type": "boolean"})
def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def optional(check: Check) -> Check:
    def checked(value: Any) -> Any:
        return None if value is None else check(value)

    return accepting({"anyOf": [schema_of(check), {"type": "null"}]})(checked)


def list_of(check: Check, *, length: int | None = None, min_length: int = 0, max_length: int | None = None) -> Check:
    def checked(value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise ValueError("must be a list")
        if length is not None and len(value) != length:
            raise ValueError(f"must be a list of {length} values")
        if len(value) < min_length:
            raise ValueError(f"must have at least {min_length} values")
        if max_length is not None and len(value) > max_length:
            raise ValueError(f"must have at most {max_length} values")
        checked_values = []
        for v in value:
            try:
                checked_values.append(check(v))
            except (ValueError, TypeError) as error:
                raise ValueError(f"each value {error}") from None
        return checked_values

    bounds = {"minItems": length if length is not None else min_length, "maxItems": length or max_length}
    schema = {"type": "array", "items": schema_of(check), **{k: v for k, v in bounds.items() if v}}
    return accepting(schema)(checked)


def one_of(*choices: str) -> Check:
    def checked(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}")
        return value

    return accepting({"enum": list(choices)})(checked)


@accepting({"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}, "minItems": 1}]})
def number_or_list(value: Any) -> float | list[float]:
    """A scalar, or a list with one value per class."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("must be a number or a non-empty list of numbers")
        return [_number(v) for v in value]
    return _number(value)
