"""The TorchScript op allow-list (starvation/checkpoints/allowed_ops.txt), read from an archive's sources before any
of its code runs, and again from the loaded graphs."""
from __future__ import annotations

import io
import re
import zipfile

import pytest
import torch
from torch import nn

from starvation import networks
from starvation.checkpoints import CheckpointError, load_checkpoint, validate_checkpoint
from starvation.checkpoints.script_ops import ALLOWED_OPS, check_archive
from tests.fixtures_models import (
    BehindAnInterface,
    ColourBlind,
    ColourOnly,
    InAScriptClass,
    PrintsWhileLoading,
    ReadsPastItsTensor,
    UnsafeSparse,
    WritesPastItsTensor,
    torchscript_bytes,
)

SHAPE = (2, 14, 14)
# What never belongs on the list: views without bounds checks, unchecked constructors, storage and pointers,
# files, printing, threads, RPC.
NEVER = re.compile(r"unsafe|_reshape_alias|as_strided|^aten::set_$|from_file|storage|data_ptr|::save$|_print|"
                   r"Print|fork|::wait$|rpc|PythonOp")


def corpus() -> list[nn.Module]:
    """Networks as people write them: ours, and the common layers of vision and sequence models."""
    return [
        networks.build_network("mlp", {"hidden": [8, 8]}, SHAPE, 1),
        networks.build_network("cnn", {}, SHAPE, 1),
        networks.build_network("resnet18", {}, SHAPE, 2),
        nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.GroupNorm(2, 4),
                      nn.GELU(), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(4), nn.Dropout(0.2),
                      nn.Linear(4, 3), nn.Tanh(), nn.Sigmoid(), nn.Softmax(dim=1)),
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
        nn.LSTM(3, 3),
        ColourOnly(),
        ColourBlind(),
    ]


@pytest.mark.parametrize("index", range(len(corpus())))
def test_models_as_people_write_them_pass_both_checks(index):
    data = torchscript_bytes(corpus()[index].eval())
    assert check_archive(data) <= ALLOWED_OPS
    load_checkpoint(data, "torchscript")  # the graph check after loading


def test_the_list_names_only_ops_torch_has_and_none_that_reach_past_a_tensor():
    schemas = {str(s.name) for s in torch._C._jit_get_all_schemas()}
    assert {op for op in ALLOWED_OPS if op.startswith("aten::")} <= schemas
    assert [op for op in ALLOWED_OPS if NEVER.search(op)] == []


@pytest.mark.parametrize(("model", "op"), [
    (ReadsPastItsTensor(), "aten::_reshape_alias"),
    (WritesPastItsTensor(), "aten::_reshape_alias"),
    (UnsafeSparse(), "aten::_sparse_coo_tensor_unsafe"),
    (BehindAnInterface("/etc/hostname"), "aten::from_file"),
    (InAScriptClass("/etc/hostname"), "aten::from_file"),
])
def test_ops_off_the_list_are_refused_wherever_the_code_hides_them(model, op):
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(torchscript_bytes(model), "torchscript")
    assert refused.value.code == "forbidden_op" and op in refused.value.message


def test_setstate_never_runs_before_the_check(capfd):
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(torchscript_bytes(PrintsWhileLoading()), "torchscript")
    assert refused.value.code == "forbidden_op" and "prim::Print" in refused.value.message
    assert "__setstate__ ran" not in capfd.readouterr().out


def rewritten(data: bytes, edit) -> bytes:
    """The archive with every code file passed through `edit` (what a hand-made archive could hold)."""
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for entry in source.infolist():
            content = source.read(entry)
            if entry.filename.endswith(".py"):
                content = edit(content.decode()).encode()
            target.writestr(entry, content)
    return out.getvalue()


def test_an_op_torch_adds_later_is_refused_until_someone_lists_it():
    data = rewritten(torchscript_bytes(ColourOnly()), lambda code: code.replace("torch.mean(", "torch.mean_2099("))
    with pytest.raises(CheckpointError) as refused:
        check_archive(data)
    assert refused.value.code == "forbidden_op" and "aten::mean_2099" in refused.value.message


@pytest.mark.parametrize("edit", [
    lambda code: code.replace("torch.mean(", "torch.from_file("),  # called directly
    lambda code: code.replace("    return ", "    _9 = torch.from_file\n    return ", 1),  # an alias, never called here
    lambda code: code.replace("torch.mean(", "ops.aten.from_file("),
    lambda code: code.replace("torch.mean(", "open("),  # a name TorchScript does not have
])
def test_a_hand_made_archive_cannot_hide_an_op(edit):
    with pytest.raises(CheckpointError) as refused:
        check_archive(rewritten(torchscript_bytes(ColourOnly()), edit))
    assert refused.value.code == "forbidden_op"


def test_a_pickle_naming_a_torchbind_class_is_refused():
    data = torchscript_bytes(ColourOnly())
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for entry in source.infolist():
            content = source.read(entry)
            if entry.filename.endswith("/data.pkl"):
                content = b"\x80\x02c__torch__.torch.classes.quantized\nLinearPackedParamsBase\n)\x81."
            target.writestr(entry, content)
    with pytest.raises(CheckpointError) as refused:
        check_archive(out.getvalue())
    assert refused.value.code == "forbidden_op" and "torch.classes" in refused.value.message


class WideOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :7] * 0 + 1234567


def test_a_wrong_output_shape_is_refused_without_echoing_what_the_model_computed():
    with pytest.raises(CheckpointError) as refused:
        validate_checkpoint(torchscript_bytes(WideOutput()), "torchscript", input_shape=SHAPE, num_classes=2,
                            max_bytes=1 << 20)
    assert refused.value.code == "bad_output_shape"
    assert "7" not in refused.value.message and "one logit per example" in refused.value.message
