"""Sniffing a model file from its bytes: which of our formats it is, or why it is refused."""

from __future__ import annotations

import io
import struct
import zipfile

from starvation.checkpoints.errors import CheckpointError

FORMATS = ("torchscript", "onnx", "safetensors")


# --------------------------------------------------------------------------------------------
# Identifying a file from its bytes (nothing here unpickles or imports torch's loaders)
# --------------------------------------------------------------------------------------------


def identify(data: bytes, *, max_unpacked_bytes: int | None = None) -> tuple[str, object]:
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


def check_kind(kind: str, fmt: str) -> None:
    """A CheckpointError unless the file is what its declared format `fmt` says (`identify`'s kind)."""
    if kind == fmt:
        return
    if kind in FORMATS:
        raise CheckpointError("format_mismatch", f"The file was declared {fmt} but is a {kind} file.")
    if kind == "damaged_zip" and fmt == "torchscript":
        raise CheckpointError("load_failed", "The TorchScript archive is truncated or damaged; upload it again.")
    raise CheckpointError("bad_format", f"The file is {_KIND_EXPLAINED[kind]}.{_HOW_TO_EXPORT}")
