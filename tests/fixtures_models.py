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
