"""Models that users upload, loaded without ever unpickling anything, and wrapped for the audit.

Three formats are accepted: TorchScript archives, ONNX models and safetensors weights of a
built-in architecture. A file is identified from its bytes before any loader sees it: a raw
pickle, a `torch.save` checkpoint (a pickle inside a zip) or anything unknown is refused with
`CheckpointError`, and is never handed to `pickle`, `torch.load` or `torch.jit.load`. Nothing
here calls `pickle` or `torch.load`; TorchScript archives go to `torch.jit.load`, whose reader
rebuilds TorchScript modules and tensors only.

Error codes (`CheckpointError.code`):
- `empty_file`, `too_large`: the size check, done first.
- `bad_format`: not a format we accept (pickle, torch.save checkpoint, unknown bytes).
- `format_mismatch`: a format we accept, but not the one declared.
- `load_failed`: the declared format, but damaged or refused by its loader.
- `bad_input_shape`: the model cannot take a batch of the dataset's `input_shape`.
- `bad_output_shape`: the output is not [N, 1] (binary) or [N, num_classes].
- `unknown_layer`: the caller named a feature layer the model does not have.
- `missing_arch`: safetensors weights without the built-in architecture they belong to.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from torch import nn

from starvation.networks import output_count

FORMATS = ("torchscript", "onnx", "safetensors")
DEFAULT_FEATURE_LAYER = "features"  # the built-in networks' penultimate representation
DRY_RUN_BATCH = 2
_MAX_INPUT_RANK = 5
_MAX_INPUT_NUMEL = 1 << 24  # per example; keeps a dry run from allocating absurd batches
_MESSAGE_CHARS = 300
_MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit

_ONNX_INPUT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


class CheckpointError(ValueError):
    """An uploaded model we will not use, with a snake_case `code` and a message for a person.

    The message is ours: it never quotes what a model computed or raised. What a loader or the
    model said goes in `detail`, for the server's log only.
    """

    def __init__(self, code: str, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


# --------------------------------------------------------------------------------------------
# What the audit sees of a model
# --------------------------------------------------------------------------------------------


class AuditableModel:
    """A trained classifier as the audit sees it.

    `logits(x)` is [N, 1] for a binary model (one logit) and [N, k] for k classes.
    `features(x)` is the penultimate representation flattened to [N, d], or None when no layer
    is reachable; then `no_features_reason` says why. Inputs may live on any device; outputs
    come back on the input's device.
    """

    format: str
    feature_layer: str | None
    no_features_reason: str | None

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> "AuditableModel":
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError


FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# A model file by path, or its bytes (the jail reads the file before it locks itself down).
Source = Union[str, Path, bytes]


def _read(source: Source) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


class TorchModel(AuditableModel):
    """An `nn.Module` or TorchScript module, with a way to read its feature layer (or none)."""

    def __init__(
        self,
        module: nn.Module,
        *,
        fmt: str,
        feature_fn: FeatureFn | None,
        feature_layer: str | None,
        no_features_reason: str | None = None,
    ) -> None:
        self.module = module.eval()
        self.format = fmt
        self._feature_fn = feature_fn
        self.feature_layer = feature_layer if feature_fn is not None else None
        self.no_features_reason = None if feature_fn is not None else no_features_reason
        self._device = _module_device(module)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> "TorchModel":
        self._device = torch.device(device)
        self.module.to(self._device)
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.module(x.to(self._device))
        return _as_logits(out).to(x.device)

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._feature_fn is None:
            return None
        with torch.no_grad():
            out = self._feature_fn(self.module, x.to(self._device))
        return out.flatten(1).to(x.device)


class OnnxModel(AuditableModel):
    """An ONNX model run by onnxruntime on CPU; the feature layer is an intermediate tensor."""

    format = "onnx"

    def __init__(self, proto, *, feature_layer: str | None = None) -> None:
        import onnx
        import onnxruntime as ort

        self._logit_name = proto.graph.output[0].name
        self.feature_layer = feature_layer
        self.no_features_reason = None
        if feature_layer is None:
            self.no_features_reason = (
                "ONNX graphs have no standard feature layer; name an intermediate tensor "
                "(feature_layer) to probe it"
            )
        else:
            produced = {out for node in proto.graph.node for out in node.output}
            if feature_layer not in produced:
                raise CheckpointError(
                    "unknown_layer",
                    f"The ONNX graph has no tensor named {feature_layer!r}.",
                )
            if feature_layer not in {o.name for o in proto.graph.output}:
                proto = _copy_proto(proto)
                proto.graph.output.append(onnx.ValueInfoProto(name=feature_layer))

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CheckpointError(
                "load_failed", "onnxruntime could not load the model.", detail=_first_line(exc)
            ) from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise CheckpointError(
                "bad_input_shape",
                f"The model takes {len(inputs)} inputs; the audit feeds exactly one tensor.",
            )
        self._input = inputs[0]
        if self._input.type not in _ONNX_INPUT_DTYPES:
            raise CheckpointError(
                "bad_input_shape",
                f"The model's input is {self._input.type}; the audit feeds float tensors.",
            )
        self._dtype = _ONNX_INPUT_DTYPES[self._input.type]
        batch = self._input.shape[0] if self._input.shape else None
        self._fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    @property
    def declared_input_shape(self) -> list[int | str | None]:
        """The input's shape per example as the graph declares it (symbolic dims as names)."""
        return list(self._input.shape[1:])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> "OnnxModel":
        return self  # runs on onnxruntime's CPU provider; inputs and outputs are moved per call

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return _as_logits(self._run(x, self._logit_name))

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.feature_layer is None:
            return None
        return self._run(x, self.feature_layer).flatten(1)

    def _run(self, x: torch.Tensor, output: str) -> torch.Tensor:
        arr = x.detach().to("cpu").numpy().astype(self._dtype, copy=False)
        if self._fixed_batch is None:
            result = self._session.run([output], {self._input.name: arr})[0]
        else:  # exported without a dynamic batch axis: feed it chunks of its own batch size
            size, chunks = self._fixed_batch, []
            for start in range(0, len(arr), size):
                chunk = arr[start : start + size]
                pad = size - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
                chunks.append(self._session.run([output], {self._input.name: chunk})[0][: size - pad])
            result = np.concatenate(chunks)
        return torch.from_numpy(np.asarray(result, dtype=np.float32)).to(x.device)


def wrap_module(module: nn.Module, *, feature_layer: str | None = None) -> TorchModel:
    """An in-memory network (e.g. one just trained) as an AuditableModel.

    The feature layer is read with a forward hook on the named submodule: by default
    `features` (every built-in network has it), or for an `nn.Sequential` its second-to-last child.
    """
    layer = feature_layer or DEFAULT_FEATURE_LAYER
    if feature_layer is None and isinstance(module, nn.Sequential) and len(module) >= 2:
        layer = list(dict(module.named_children()))[-2]  # what the last layer reads
    target = _get_submodule(module, layer)
    if target is None:
        if feature_layer is not None:
            raise CheckpointError("unknown_layer", f"The model has no submodule named {layer!r}.")
        return TorchModel(
            module, fmt="module", feature_fn=None, feature_layer=None,
            no_features_reason=f"the model has no submodule named {layer!r}",
        )
    return TorchModel(module, fmt="module", feature_fn=_hooked(layer), feature_layer=layer)


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
    kind, parsed = _identify(data)
    _check_kind(kind, fmt)
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
    num_outputs, feature_layer} (plus arch and arch_params for safetensors, read from the
    header's metadata where not given); raises CheckpointError otherwise.
    """
    data = _read(source)
    _check_fmt(fmt)
    size = len(data)
    if size == 0:
        raise CheckpointError("empty_file", "The uploaded file is empty.")
    if size > max_bytes:
        raise CheckpointError(
            "too_large", f"The file is {size} bytes; the limit is {max_bytes} bytes."
        )
    kind, parsed = _identify(data, max_unpacked_bytes=max_bytes)
    _check_kind(kind, fmt)

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
        data, fmt, arch=arch, arch_params=arch_params, input_shape=input_shape,
        num_outputs=num_outputs, static_checks=static_checks,
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
            f"{[DRY_RUN_BATCH, *input_shape]} (it raised {_exception_name(exc)}).",
            detail=_first_line(exc),
        ) from None
    shape = list(out.shape)
    allowed = {1, num_classes} if num_classes is not None else None
    if len(shape) != 2 or shape[0] != DRY_RUN_BATCH or (allowed and shape[1] not in allowed):
        wanted = f"[{DRY_RUN_BATCH}, 1]" + (f" or [{DRY_RUN_BATCH}, {num_classes}]" if num_classes else "")
        # Only a 2-D shape is echoed: dimensions are numbers the model chose.
        got = f"shape {shape}" if len(shape) == 2 else f"a tensor of rank {len(shape)}"
        raise CheckpointError(
            "bad_output_shape",
            f"For a batch of {DRY_RUN_BATCH} the model returned {got}; expected {wanted} "
            "(one logit for a binary task, one logit per class otherwise).",
        )
    return {
        "format": fmt,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": size,
        "input_shape": list(input_shape),
        "output_shape": shape,
        "num_outputs": shape[1],
        "feature_layer": model.feature_layer,
        **({"arch": arch, "arch_params": arch_params or {}} if fmt == "safetensors" else {}),
    }


# --------------------------------------------------------------------------------------------
# Identifying a file from its bytes (nothing here unpickles or imports torch's loaders)
# --------------------------------------------------------------------------------------------


def _identify(data: bytes, *, max_unpacked_bytes: int | None = None) -> tuple[str, object]:
    """What the file is: torchscript | onnx | safetensors | pickle | torch_save | damaged_zip |
    zip | unknown. For onnx, the parsed ModelProto comes along so it is parsed only once."""
    head = data[:16]
    if head[:1] == b"\x80":  # pickle protocol 2+ (and what torch.save wrote before zips)
        return "pickle", None
    if head[:2] == b"PK":
        return _identify_zip(data, max_unpacked_bytes), None
    if _looks_like_safetensors(data):
        return "safetensors", None
    proto = _parse_onnx(data)
    if proto is not None:
        return "onnx", proto
    return "unknown", None


def _identify_zip(data: bytes, max_unpacked_bytes: int | None) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "damaged_zip"
    unpacked = sum(info.file_size for info in infos)
    if max_unpacked_bytes is not None and unpacked > max_unpacked_bytes:
        raise CheckpointError(
            "too_large",
            f"The archive unpacks to {unpacked} bytes; the limit is {max_unpacked_bytes} bytes.",
        )
    names = [info.filename for info in infos]
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) != 1 or not all("/" in name for name in names):
        return "zip"
    inner = {name.split("/", 1)[1] for name in names}
    if any(name.startswith("code/") for name in inner) or {"constants.pkl", "data.pkl"} <= inner:
        return "torchscript"
    if "data.pkl" in inner:
        return "torch_save"
    return "zip"


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 9:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 2 <= header_len <= len(data) - 8 and data[8:9] == b"{"


def _parse_onnx(data: bytes):
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError, OSError, TypeError):
        return None
    # Protobuf accepts many byte strings; an ONNX model has an IR version and a graph.
    if proto.ir_version <= 0 or not proto.graph.output or not proto.graph.node:
        return None
    return proto


_KIND_EXPLAINED = {
    "pickle": "a raw Python pickle; pickles can run code when loaded and are never accepted",
    "torch_save": "a torch.save checkpoint (a pickle inside a zip), which is never unpickled",
    "damaged_zip": "a truncated or damaged zip archive",
    "zip": "a zip archive without the TorchScript layout",
    "unknown": "not a TorchScript archive, an ONNX model or a safetensors file",
}
_HOW_TO_EXPORT = (
    " Export the model with torch.jit.script/trace (format torchscript) or torch.onnx.export "
    "(format onnx), or upload safetensors weights of a built-in architecture."
)


def _check_kind(kind: str, fmt: str) -> None:
    if kind == fmt:
        return
    if kind in FORMATS:
        raise CheckpointError(
            "format_mismatch", f"The file was declared {fmt} but is a {kind} file."
        )
    if kind == "damaged_zip" and fmt == "torchscript":
        raise CheckpointError(
            "load_failed", "The TorchScript archive is truncated or damaged; upload it again."
        )
    raise CheckpointError(
        "bad_format", f"The file is {_KIND_EXPLAINED[kind]}.{_HOW_TO_EXPORT}"
    )


# --------------------------------------------------------------------------------------------
# Per-format loaders
# --------------------------------------------------------------------------------------------


def _load_torchscript(
    data: bytes, input_shape: tuple[int, ...] | None, feature_layer: str | None, static_checks: bool
) -> TorchModel:
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; uploads still use it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError and friends for damaged archives
        raise CheckpointError(
            "load_failed", "TorchScript could not load the archive.", detail=_first_line(exc)
        ) from None
    if static_checks:
        check_script_ops(module)
    module.eval()
    feature_fn, layer, reason = _script_feature_fn(module, feature_layer, input_shape)
    return TorchModel(
        module, fmt="torchscript", feature_fn=feature_fn, feature_layer=layer,
        no_features_reason=reason,
    )


# TorchScript ops a model may use: the tensor maths of aten/prim/quantized, less what touches
# files, streams, other processes or threads. Anything else (custom ops included) is refused.
_SCRIPT_NAMESPACES = {"aten", "prim", "prims", "quantized", "_quantized"}
_SCRIPT_FORBIDDEN_OPS = {
    "aten::from_file", "aten::save", "aten::_print", "aten::wait", "prim::Print",
    "prim::fork", "prim::awaitable", "prim::awaitable_nowait", "prim::awaitable_wait",
    "prim::rpc_async", "prim::rpc_remote", "prim::rpc_sync", "prim::PythonOp",
}


def check_script_ops(module: torch.jit.ScriptModule) -> None:
    """Refuse a TorchScript model whose code (every method of every submodule, inlined) calls
    an op outside the allow-list. Defence in depth: the jail is what keeps a model away from
    files and the network; this names the problem for the uploader."""
    refused: set[str] = set()

    def visit(block) -> None:
        for node in block.nodes():
            kind = node.kind()
            if kind in _SCRIPT_FORBIDDEN_OPS or kind.split("::", 1)[0] not in _SCRIPT_NAMESPACES:
                refused.add(kind)
            for inner in node.blocks():
                visit(inner)

    for submodule in module.modules():
        scripted = getattr(submodule, "_c", None)
        if scripted is None:
            continue
        for name in scripted._method_names():
            graph = scripted._get_method(name).graph.copy()
            torch._C._jit_pass_inline(graph)
            visit(graph.block())
    if refused:
        shown = sorted(refused)[:5]
        raise CheckpointError(
            "forbidden_op",
            f"The TorchScript model calls {len(refused)} op(s) we do not run for uploaded models "
            f"(file, stream, process or custom ops), e.g. {', '.join(_printable(k) for k in shown)}.",
        )


def _printable(name: str) -> str:
    """An op name as a person may see it: short, and only plain characters."""
    clean = "".join(c if c.isascii() and (c.isalnum() or c in ":_.") else "?" for c in name)
    return clean[:60]


def _script_feature_fn(
    module: nn.Module, feature_layer: str | None, input_shape: tuple[int, ...] | None
) -> tuple[FeatureFn | None, str | None, str | None]:
    """TorchScript modules take no forward hooks, so a layer is read by calling it directly.

    That is only right when the model is the layer followed by the rest, so it is used only
    when that composition is checked to reproduce the model's output: a top-level layer with a
    top-level `head`, or a prefix of a scripted `nn.Sequential`.
    """
    children = dict(module.named_children())
    layer = feature_layer or DEFAULT_FEATURE_LAYER
    is_sequential = getattr(module, "original_name", "") == "Sequential"
    if feature_layer is not None and layer not in children:
        raise CheckpointError(
            "unknown_layer",
            f"The TorchScript model has no top-level submodule named {layer!r} "
            f"(it has {sorted(children)}).",
        )
    if layer in children and "head" in children and layer != "head":
        def features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return getattr(m, layer)(x)

        def rest(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
            return m.head(h)
    elif is_sequential and len(children) >= 2 and (feature_layer is None or layer in children):
        names = list(children)
        layer = feature_layer if feature_layer is not None else names[-2]
        cut = names.index(layer) + 1
        if cut == len(names):
            return None, None, f"{layer!r} is the model's last layer (its output), not a feature layer"

        def features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            for name in names[:cut]:
                x = getattr(m, name)(x)
            return x

        def rest(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
            for name in names[cut:]:
                h = getattr(m, name)(h)
            return h
    else:
        return None, None, (
            f"TorchScript modules cannot be hooked, and this one has no top-level "
            f"{layer!r} and 'head' (nor is it an nn.Sequential) to read a feature layer from"
        )
    if input_shape is None:
        return None, None, "input_shape is needed to check that the feature layer feeds the output"
    probe = torch.rand((4, *input_shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            expected = module(probe)
            hidden = features(module, probe)
            composed = rest(module, hidden)
        matches = (
            isinstance(hidden, torch.Tensor)
            and isinstance(expected, torch.Tensor)
            and isinstance(composed, torch.Tensor)
            and composed.shape == expected.shape
            and torch.allclose(composed, expected, rtol=1e-4, atol=1e-5)
        )
    except Exception:
        matches = False
    if not matches:
        return None, None, (
            f"calling {layer!r} and then the rest of the model does not reproduce the model's "
            "output, so its output is not known to be the penultimate representation"
        )
    return features, layer, None


def _load_safetensors(
    data: bytes,
    arch: str | None,
    arch_params: dict | None,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    feature_layer: str | None,
) -> TorchModel:
    """Weights of a built-in network; what the caller leaves out is read from the header's
    metadata, where `starvation.export` records arch, arch_params, input_shape and num_outputs."""
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
    from starvation.export import load_builtin

    try:
        module = load_builtin(data, arch, arch_params or {}, tuple(input_shape), num_outputs)
    except Exception as exc:  # unknown arch, missing or mis-shaped tensors
        raise CheckpointError(
            "load_failed", f"The weights do not fit the {_printable(str(arch))!r} network.",
            detail=_first_line(exc),
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
        raise CheckpointError(
            "load_failed", "The safetensors header is malformed.", detail=_first_line(exc)
        ) from None
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
            "The ONNX model refers to external data files; export it with every tensor inside "
            "the one file.",
        )
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise CheckpointError(
            "load_failed", "The ONNX model is not valid (onnx.checker refused it).", detail=_first_line(exc)
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
        raise CheckpointError(
            "bad_format", f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}."
        )


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


def _as_logits(out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise CheckpointError(
            "bad_output_shape",
            f"The model returned {type(out).__name__}, not a tensor of logits.",
        )
    return out.float()


def _hooked(layer: str) -> FeatureFn:
    def features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = module.get_submodule(layer).register_forward_hook(
            lambda _m, _inputs, output: captured.append(output)
        )
        try:
            module(x)
        finally:
            handle.remove()
        return captured[-1]

    return features


def _get_submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _copy_proto(proto):
    copy = type(proto)()
    copy.CopyFrom(proto)
    return copy


def out_of_memory(exc: BaseException) -> bool:
    """Whether torch (or Python) ran out of memory: under the jail's RLIMIT_AS, the model's doing."""
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def _exception_name(exc: BaseException) -> str:
    """The type's name only: a model controls its exceptions' messages, not torch's class names."""
    return _printable(type(exc).__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:_MESSAGE_CHARS]
