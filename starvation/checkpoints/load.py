"""Loading and validating an upload: the per-format loaders, the TorchScript op allow-list, the ONNX checks."""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import warnings
from pathlib import Path

import torch

from starvation.checkpoints import script_ops
from starvation.checkpoints.detect import FORMATS, check_kind, identify
from starvation.checkpoints.errors import CheckpointError, exception_name, first_line, out_of_memory, printable
from starvation.checkpoints.save import load_builtin
from starvation.checkpoints.wrap import AuditableModel, OnnxModel, TorchModel, script_model, wrap_module
from starvation.networks import output_count

DRY_RUN_BATCH = 2
_MAX_INPUT_RANK = 5
_MAX_INPUT_NUMEL = 1 << 24  # per example; keeps a dry run from allocating absurd batches
_MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit

# A model file by path, or its bytes (the jail reads the file before it locks itself down).
Source = str | Path | bytes


def _read(source: Source) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


# --------------------------------------------------------------------------------------------
# Loading and validating
# --------------------------------------------------------------------------------------------


def load_checkpoint(
    source: Source,
    fmt: str,
    *,
    arch: str | None = None,
    arch_params: dict | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
    num_outputs: int | None = None,
    feature_layer: str | None = None,
    static_checks: bool = True,
) -> AuditableModel:
    """Load an uploaded model on CPU, refusing anything that is not the declared format.

    `input_shape` (per example) is needed for safetensors, and for TorchScript to check that
    the feature layer really feeds the output (TorchScript modules cannot be hooked).
    `num_outputs` is the built-in network's output width (1 for binary).
    `static_checks=False` skips the TorchScript op allow-list and the ONNX external-data check:
    only for testing that the jail holds on its own.
    """
    data = _read(source)
    _check_fmt(fmt)
    if input_shape is not None:
        input_shape = _check_input_shape(input_shape)
    kind, parsed = identify(data)
    check_kind(kind, fmt)
    if fmt == "torchscript":
        return _load_torchscript(data, input_shape, feature_layer, static_checks)
    if fmt == "onnx":
        _check_onnx_proto(parsed, static_checks)
        return OnnxModel(parsed, feature_layer=feature_layer)
    return _load_safetensors(data, arch, arch_params, input_shape, num_outputs, feature_layer)


def validate_checkpoint(
    source: Source,
    fmt: str,
    *,
    arch: str | None = None,
    arch_params: dict | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
    num_classes: int | None = None,
    max_bytes: int,
    static_checks: bool = True,
) -> dict:
    """Check an upload before it is stored: size, format sniffed from the bytes, then a load
    and a dry forward pass on zeros of `input_shape` (batch 2) whose output must be [2, 1] or
    [2, num_classes]. Returns {format, sha256, size_bytes, input_shape, output_shape,
    num_outputs, feature_layer, head (what `HeadSite.describe` says, or None)} (plus arch and arch_params for safetensors, read from the
    header's metadata where not given); raises CheckpointError otherwise.
    """
    data = _read(source)
    _check_fmt(fmt)
    size = len(data)
    if size == 0:
        raise CheckpointError("empty_file", "The uploaded file is empty.")
    if size > max_bytes:
        raise CheckpointError("too_large", f"The file is {size} bytes; the limit is {max_bytes} bytes.")
    kind, parsed = identify(data, max_unpacked_bytes=max_bytes)
    check_kind(kind, fmt)

    num_outputs = None
    if fmt == "safetensors":  # what the caller leaves out may be in the header's metadata
        declared = _safetensors_metadata(data)
        arch = arch or declared.get("arch")
        arch_params = arch_params if arch_params is not None else declared.get("arch_params")
        input_shape = input_shape or declared.get("input_shape")
        num_outputs = output_count(num_classes) if num_classes is not None else declared.get("num_outputs")
    if input_shape is None and fmt == "onnx":
        input_shape = _static_onnx_input_shape(parsed)
    if input_shape is None:
        raise CheckpointError(
            "bad_input_shape",
            f"input_shape is required to check a {fmt} model (it cannot be read from the file).",
        )
    input_shape = _check_input_shape(input_shape)
    model = load_checkpoint(
        data,
        fmt,
        arch=arch,
        arch_params=arch_params,
        input_shape=input_shape,
        num_outputs=num_outputs,
        static_checks=static_checks,
    )
    if isinstance(model, OnnxModel):
        _check_onnx_input(model, input_shape)

    try:
        out = model.logits(torch.zeros((DRY_RUN_BATCH, *input_shape)))
    except CheckpointError:
        raise
    except Exception as exc:
        if out_of_memory(exc):
            raise CheckpointError("memory_limit", "The model needed more memory than it may use.") from None
        raise CheckpointError(
            "bad_input_shape",
            f"The model failed a forward pass on a batch of shape "
            f"{[DRY_RUN_BATCH, *input_shape]} (it raised {exception_name(exc)}).",
            detail=first_line(exc),
        ) from None
    shape = list(out.shape)
    allowed = {1, num_classes} if num_classes is not None else None
    if len(shape) != 2 or shape[0] != DRY_RUN_BATCH or (allowed and shape[1] not in allowed):
        # No dimension is echoed: they are numbers the model chose (a hostile one spells memory with them).
        raise CheckpointError(
            "bad_output_shape",
            "The model's output is not one logit per example (binary task) or one logit per class per example"
            + (f" ({num_classes} classes)." if num_classes else "."),
        )
    return {
        "format": fmt,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": size,
        "input_shape": list(input_shape),
        "output_shape": shape,
        "num_outputs": shape[1],
        "feature_layer": model.feature_layer,
        "head": model.head_description()
        or (
            None if fmt == "safetensors" else {"repairable": False, "not_repairable_because": model.no_features_reason}
        ),
        **({"arch": arch, "arch_params": arch_params or {}} if fmt == "safetensors" else {}),
    }


# --------------------------------------------------------------------------------------------
# Per-format loaders
# --------------------------------------------------------------------------------------------


def _load_torchscript(
    data: bytes, input_shape: tuple[int, ...] | None, feature_layer: str | None, static_checks: bool
) -> TorchModel:
    if static_checks:  # before torch.jit.load, which runs the archive's __setstate__ methods
        script_ops.check_archive(data)
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; uploads still use it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError and friends for damaged archives
        raise CheckpointError(
            "load_failed", "TorchScript could not load the archive.", detail=first_line(exc)
        ) from None
    if static_checks:
        check_script_ops(module)
    module.eval()
    return script_model(module, feature_layer, input_shape)


def check_script_ops(module: torch.jit.ScriptModule) -> None:
    """The second wall, after loading (in the jail): refuse a module whose inlined graphs call an op outside
    ALLOWED_OPS. The first, `script_ops.check_archive`, read the archive's sources before any of it ran."""
    refused = script_ops.graph_ops(module) - script_ops.ALLOWED_OPS
    if refused:
        raise script_ops.forbidden(refused)


def _load_safetensors(
    data: bytes,
    arch: str | None,
    arch_params: dict | None,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    feature_layer: str | None,
) -> TorchModel:
    """Weights of a built-in network; what the caller leaves out is read from the header's
    metadata, where `starvation.checkpoints.save` records arch, arch_params, input_shape and num_outputs."""
    declared = _safetensors_metadata(data)
    arch = arch or declared.get("arch")
    arch_params = arch_params if arch_params is not None else declared.get("arch_params")
    input_shape = input_shape or declared.get("input_shape")
    num_outputs = num_outputs or declared.get("num_outputs")
    if not arch:
        raise CheckpointError(
            "missing_arch", "safetensors weights need `arch` (and `arch_params`) of a built-in network."
        )
    if input_shape is None or num_outputs is None:
        raise CheckpointError(
            "bad_input_shape",
            "safetensors weights need input_shape and the number of classes to build the network.",
        )
    try:
        module = load_builtin(data, arch, arch_params or {}, tuple(input_shape), num_outputs)
    except Exception as exc:  # unknown arch, missing or mis-shaped tensors
        raise CheckpointError(
            "load_failed",
            f"The weights do not fit the {printable(str(arch))!r} network.",
            detail=first_line(exc),
        ) from None
    model = wrap_module(module, feature_layer=feature_layer)
    model.format = "safetensors"
    return model


def _safetensors_metadata(data: bytes) -> dict:
    """The header's metadata as {arch, arch_params, input_shape, num_outputs}, each only where
    present and well-formed. The header is JSON (8-byte length, then the JSON); the tensors are
    read later by safetensors itself, which never unpickles."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        if length > _MAX_SAFETENSORS_HEADER:
            raise ValueError(f"header of {length} bytes")
        header = json.loads(data[8 : 8 + length])
        raw = header.get("__metadata__") or {}
        if not isinstance(raw, dict):
            raise ValueError("__metadata__ is not an object")
    except Exception as exc:
        raise CheckpointError("load_failed", "The safetensors header is malformed.", detail=first_line(exc)) from None
    declared: dict = {}
    try:
        if isinstance(raw.get("arch"), str):
            declared["arch"] = raw["arch"]
        if "arch_params" in raw and isinstance(params := json.loads(raw["arch_params"]), dict):
            declared["arch_params"] = params
        if "input_shape" in raw:
            declared["input_shape"] = _check_input_shape(json.loads(raw["input_shape"]))
        if "num_outputs" in raw and int(raw["num_outputs"]) >= 1:
            declared["num_outputs"] = int(raw["num_outputs"])
    except (ValueError, CheckpointError):
        pass  # metadata is a convenience; what is malformed is treated as absent
    return declared


def _check_onnx_proto(proto, static_checks: bool = True) -> None:
    import onnx

    if static_checks and any(
        tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0
        for tensor in _onnx_tensors(proto)
    ):
        raise CheckpointError(
            "bad_format",
            "The ONNX model refers to external data files; export it with every tensor inside the one file.",
        )
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise CheckpointError(
            "load_failed", "The ONNX model is not valid (onnx.checker refused it).", detail=first_line(exc)
        ) from None


def _onnx_tensors(proto):
    """Every TensorProto of a model: initializers, sparse initializers, node attributes (tensor,
    tensors, sparse tensors) and the same inside every subgraph and local function."""
    import onnx

    def of_graph(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from of_nodes(graph.node)

    def of_nodes(nodes):
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                for sparse in [attribute.sparse_tensor, *attribute.sparse_tensors]:
                    yield sparse.values
                    yield sparse.indices
                if attribute.type == onnx.AttributeProto.GRAPH or attribute.HasField("g"):
                    yield from of_graph(attribute.g)
                for graph in attribute.graphs:
                    yield from of_graph(graph)

    yield from of_graph(proto.graph)
    for function in proto.functions:
        yield from of_nodes(function.node)


def _check_onnx_input(model: OnnxModel, input_shape: tuple[int, ...]) -> None:
    declared = model.declared_input_shape
    fits = len(declared) == len(input_shape) and all(
        not isinstance(d, int) or d <= 0 or d == want for d, want in zip(declared, input_shape)
    )
    if not fits:
        raise CheckpointError(
            "bad_input_shape",
            f"The model's input is declared as [batch, {', '.join(map(str, declared))}] but the "
            f"data has shape [batch, {', '.join(map(str, input_shape))}].",
        )


def _static_onnx_input_shape(proto) -> tuple[int, ...] | None:
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim[1:]
    if not dims or not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise CheckpointError("bad_format", f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")


def _check_input_shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
        ok = (
            1 <= len(dims) <= _MAX_INPUT_RANK
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
            and math.prod(dims) <= _MAX_INPUT_NUMEL
        )
    except TypeError:
        ok = False
    if not ok:
        raise CheckpointError(
            "bad_input_shape",
            f"input_shape must be 1 to {_MAX_INPUT_RANK} positive integers (one example, no "
            f"batch axis) of at most {_MAX_INPUT_NUMEL} values; got {shape!r}.",
        )
    return dims
