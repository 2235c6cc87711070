"""Models built outside the project's training code, to audit and to upload."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn


class ColourOnly(nn.Module):
    """Reads only the colour: which channel holds the ink."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 50.0 * (x[:, 1].mean(dim=(1, 2)) - x[:, 0].mean(dim=(1, 2))).unsqueeze(1)


class ColourBlind(nn.Module):
    """Averages the two channels first, so colour cannot matter; then a fixed linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.readout = nn.Parameter(torch.randn(14 * 14, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1).flatten(1)
        return (grey @ self.readout).unsqueeze(1)


def torchscript_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def onnx_bytes(module: nn.Module, input_shape: tuple[int, ...] = (2, 14, 14), tmp_dir: Path | None = None) -> bytes:
    import tempfile

    folder = Path(tmp_dir or tempfile.mkdtemp())
    path = folder / "model.onnx"
    torch.onnx.export(module, (torch.zeros(1, *input_shape),), str(path), input_names=["x"], output_names=["logit"],
                      dynamic_axes={"x": {0: "batch"}, "logit": {0: "batch"}}, dynamo=False)
    return path.read_bytes()


class Payload:
    """A pickle whose loading would create a marker file: it must never be loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_pickle(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(Payload(marker))


# Hostile models (issue "Untrusted models and URLs"): each one tries what an attacker tried.


class ReadsAFile(nn.Module):
    """Reads the first bytes of `path` and leaks them through its output's shape."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leaked = torch.from_file(self.path, False, 4, dtype=torch.uint8)
        return torch.zeros([x.shape[0], 0, int(leaked[0]), int(leaked[1]), int(leaked[2]), int(leaked[3])])


class ReadsAFileOnRealData(nn.Module):
    """Harmless on the upload check's zeros; on real data, reads `path` and raises its bytes."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() > 0):
            leaked = torch.from_file(self.path, False, 8, dtype=torch.uint8)
            raise RuntimeError("leak:" + str(int(leaked[0])) + "," + str(int(leaked[1])))
        return x.flatten(1)[:, :1]


class RaisesOnRealData(nn.Module):
    """Harmless on the upload check's zeros; on real data raises an error carrying its own words."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() > 0):
            raise RuntimeError("exfiltrated: 114, 111, 111, 116 /var/admin_token")
        return x.flatten(1)[:, :1]


class WritesAFile(nn.Module):
    """Maps `path` shared and overwrites its first `size` bytes with 'X'."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path, self.size = path, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.path, True, self.size, dtype=torch.uint8).fill_(88)
        return x.flatten(1)[:, :1] + written[0].float() * 0


class Prints(nn.Module):
    """Prints a line that looks like one of the service's JSON log lines."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print('{"level": "error", "logger": "gs.api", "message": "forged line"}')
        return x.flatten(1)[:, :1]


class Hoards(nn.Module):
    """Allocates 512 MiB blocks without bound (run it only under a memory limit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks: list[torch.Tensor] = []
        total = torch.zeros(1)
        for i in range(100_000):
            blocks.append(torch.full([1 << 27], float(i)))
            for block in blocks:
                total = total + block[-1]
        return x.flatten(1)[:, :1] + total


class Spins(nn.Module):
    """Computes forever."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.flatten(1)[:, :1]
        while bool(y.sum() < 1e30):
            y = y * 1.0
        return y


def onnx_reading_a_file(path: str, input_shape: tuple[int, ...] = (2, 14, 14)) -> bytes:
    """An ONNX model whose weights are a `Constant` with external data at `path`: the logits
    are the file's bytes read as floats. onnx.checker accepts it."""
    import math

    import onnx
    from onnx import TensorProto, helper

    features = math.prod(input_shape)
    weights = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[features, 1])
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", path), ("offset", "0"), ("length", str(4 * features))):
        weights.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=weights),
         helper.make_node("Flatten", ["x"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logit"])],
        "reads_a_file",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


# Hostile models of issue 29 ("Jail hardening"): memory outside a tensor, code that runs while loading, code hidden
# behind an interface or in a script class, outputs that are not numbers.


class ReadsPastItsTensor(nn.Module):
    """A 16-byte tensor viewed as 1 MiB: `_reshape_alias` checks no storage bounds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = torch.zeros(4)
        heap = torch.ops.aten._reshape_alias(small, [1 << 18], [1])
        return x.flatten(1)[:, :1] * 0 + heap.abs().sum()


class WritesPastItsTensor(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = torch.zeros(4)
        written = torch.ops.aten._reshape_alias(small, [1 << 18], [1]).fill_(1.0)
        return x.flatten(1)[:, :1] + written[0] * 0


class UnsafeSparse(nn.Module):
    """A sparse tensor whose index lies far past its size, made dense without a check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = torch.tensor([[1 << 30]])
        values = torch.ones(1)
        dense = torch.ops.aten._sparse_coo_tensor_unsafe(indices, values, [4]).to_dense()
        return x.flatten(1)[:, :1] + dense.sum()


class PrintsWhileLoading(nn.Module):
    """Its `__setstate__` runs inside torch.jit.load, before anything could check its ops."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    @torch.jit.export
    def __getstate__(self) -> tuple[float, bool]:
        return self.scale, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[float, bool]) -> None:
        print("__setstate__ ran: loading executed model code")
        self.scale = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.flatten(1)[:, :1]


@torch.jit.interface
class Reader(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pass


class ReadsOnRealData(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() > 0):  # latent on the upload check's zeros
            print("reading", self.path)
            return torch.from_file(self.path, False, 4, dtype=torch.uint8).float().sum() + x.flatten(1)[:, :1]
        return x.flatten(1)[:, :1]


class BehindAnInterface(nn.Module):
    """Calls through an interface are not inlined: the op hides from a graph check."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.reader = ReadsOnRealData(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reader.forward(x)


BehindAnInterface.__annotations__ = {"reader": Reader}  # a type, not the string `from __future__` would make it


@torch.jit.script
class Opener:
    def __init__(self, path: str) -> None:
        self.path = path

    def read(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() > 0):
            print("reading", self.path)
            return torch.from_file(self.path, False, 4, dtype=torch.uint8).float().sum() + x.flatten(1)[:, :1]
        return x.flatten(1)[:, :1]


class InAScriptClass(nn.Module):
    """A script class's methods are no submodule's: a check that walks submodules misses them."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Opener(self.path).read(x)


class NotANumber(nn.Module):
    """A plain features + head network whose head's bias is NaN or infinite: every logit is."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.features = nn.Flatten()
        self.head = nn.Linear(2 * 14 * 14, 1)
        with torch.no_grad():
            self.head.bias.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class GrowsWhileLoading(nn.Module):
    """A linear layer stored as 1 x 1 whose `__setstate__` makes it 16,000 x 16,000 (1 GiB of floats)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(1, 1))  # a buffer: __setstate__ may replace it
        self.register_buffer("bias", torch.zeros(1))

    @torch.jit.export
    def __getstate__(self) -> tuple[bool, bool]:
        return self.training, True

    @torch.jit.export
    def __setstate__(self, state: tuple[bool, bool]) -> None:
        self.training = state[0]
        self.weight = torch.zeros(16_000, 16_000)
        self.bias = torch.zeros(16_000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class HugeHeadWhileLoading(nn.Module):
    """A few KB uploaded; while loading, its head becomes 16,000 x 16,000 (1 GiB)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Flatten()
        self.head = GrowsWhileLoading()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # 16,000 logits: the head is the output's linear map
        h = self.features(x)
        return self.head(h.repeat(1, 16_000 // h.shape[1] + 1)[:, :16_000])


class SpinsOnRealData(nn.Module):
    """Harmless on the upload check's zeros; computes forever on real data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.flatten(1)[:, :1]
        while bool(y.abs().sum() > 0):
            y = y * 1.0
        return y
