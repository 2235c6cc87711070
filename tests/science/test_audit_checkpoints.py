"""Uploaded models: loaded as TorchScript, ONNX or safetensors, refused with a code otherwise, never unpickled."""
from __future__ import annotations

import hashlib
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from starvation.checkpoints import CheckpointError, load_checkpoint, validate_checkpoint, wrap_module
from tests.science.audit_fixtures import ColourReader, PickleBomb, save_onnx, save_torchscript

INPUT_SHAPE = (2, 14, 14)
MAX_BYTES = 10 * 2**20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    example = torch.rand(3, *INPUT_SHAPE)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(392, 8), nn.ReLU(), nn.Linear(8, 1))
    return {
        "torchscript": save_torchscript(ColourReader(), root / "colour.pt"),
        "onnx": save_onnx(ColourReader(), root / "colour.onnx", example),
        "onnx_fixed_batch": save_onnx(ColourReader(), root / "fixed.onnx", example[:1], dynamic_batch=False),
        "onnx_flat_input": save_onnx(nn.Linear(392, 1), root / "flat.onnx", torch.rand(3, 392)),
        "sequential": save_torchscript(mlp, root / "sequential.pt"),
        "three_outputs": save_torchscript(nn.Sequential(nn.Flatten(), nn.Linear(392, 3)), root / "three.pt"),
        "root": root,
    }


def expect_error(code: str, path, fmt: str, **kwargs) -> CheckpointError:
    kwargs = {"input_shape": INPUT_SHAPE, "num_classes": 2, "max_bytes": MAX_BYTES, **kwargs}
    with pytest.raises(CheckpointError) as caught:
        validate_checkpoint(path, fmt, **kwargs)
    assert caught.value.code == code, caught.value.message
    assert caught.value.message
    return caught.value


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_uploaded_model_gives_the_same_logits_as_the_original(files, fmt):
    model = load_checkpoint(files[fmt], fmt, input_shape=INPUT_SHAPE)
    x = torch.rand(5, *INPUT_SHAPE)
    expected = ColourReader()(x)
    assert model.logits(x).shape == (5, 1)
    torch.testing.assert_close(model.logits(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_validation_reports_format_hash_size_and_output_shape(files, fmt):
    info = validate_checkpoint(files[fmt], fmt, input_shape=INPUT_SHAPE, num_classes=2, max_bytes=MAX_BYTES)
    data = files[fmt].read_bytes()
    assert info["format"] == fmt
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["size_bytes"] == len(data)
    assert info["output_shape"] == [2, 1]
    assert info["input_shape"] == list(INPUT_SHAPE)


def test_onnx_input_shape_is_read_from_the_graph_when_not_given(files):
    info = validate_checkpoint(files["onnx"], "onnx", num_classes=2, max_bytes=MAX_BYTES)
    assert info["input_shape"] == list(INPUT_SHAPE)


def test_onnx_exported_with_a_fixed_batch_of_one_still_takes_any_batch(files):
    model = load_checkpoint(files["onnx_fixed_batch"], "onnx")
    x = torch.rand(5, *INPUT_SHAPE)
    torch.testing.assert_close(model.logits(x), ColourReader()(x), rtol=1e-5, atol=1e-5)
    validate_checkpoint(files["onnx_fixed_batch"], "onnx", input_shape=INPUT_SHAPE, num_classes=2, max_bytes=MAX_BYTES)


# ---- feature layers ------------------------------------------------------------------------

def test_torchscript_features_come_from_the_features_submodule_that_feeds_the_head(files):
    model = load_checkpoint(files["torchscript"], "torchscript", input_shape=INPUT_SHAPE)
    x = torch.rand(4, *INPUT_SHAPE)
    assert model.feature_layer == "features"
    torch.testing.assert_close(model.features(x), x.mean(dim=(2, 3)))


def test_scripted_sequential_exposes_its_second_to_last_layer(files):
    model = load_checkpoint(files["sequential"], "torchscript", input_shape=INPUT_SHAPE)
    assert model.feature_layer == "2"
    assert model.features(torch.rand(4, *INPUT_SHAPE)).shape == (4, 8)


def test_torchscript_features_are_read_from_the_graph_whatever_the_names(tmp_path):
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(392, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.body(x.flatten(1))))

    plain = Plain().eval()
    model = load_checkpoint(save_torchscript(plain, tmp_path / "plain.pt"), "torchscript", input_shape=INPUT_SHAPE)
    x = torch.rand(2, *INPUT_SHAPE)
    assert model.head_site.node == "aten::linear (out)" and model.head_site.weight == "out.weight"
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), torch.relu(plain.body(x.flatten(1))))


def test_torchscript_whose_output_no_linear_map_makes_says_which_op_does(tmp_path):
    class Clamped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(392, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.out(x.flatten(1)))

    model = load_checkpoint(save_torchscript(Clamped(), tmp_path / "c.pt"), "torchscript", input_shape=INPUT_SHAPE)
    assert model.feature_layer is None and model.features(torch.rand(2, *INPUT_SHAPE)) is None
    assert "made by aten::relu, which is not a linear map" in model.no_features_reason


def test_torchscript_features_are_what_the_head_reads(tmp_path):
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Flatten()
            self.head = nn.Linear(392, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x * 2.0))  # features(x) alone is not what the head sees

    model = load_checkpoint(save_torchscript(Skips(), tmp_path / "skips.pt"), "torchscript", input_shape=INPUT_SHAPE)
    x = torch.rand(2, *INPUT_SHAPE)
    assert model.feature_layer == "features"
    torch.testing.assert_close(model.features(x), (x * 2.0).flatten(1))


def test_onnx_features_are_the_last_gemms_input_or_a_named_tensor(files):
    import onnx

    graph = onnx.load(str(files["onnx"])).graph
    gemm = next(node for node in graph.node if node.op_type == "Gemm")
    x = torch.rand(3, *INPUT_SHAPE)
    default = load_checkpoint(files["onnx"], "onnx")
    assert default.feature_layer == gemm.input[0] and default.no_features_reason is None
    torch.testing.assert_close(default.features(x), x.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)

    means = next(node.output[0] for node in graph.node if node.op_type == "ReduceMean")
    model = load_checkpoint(files["onnx"], "onnx", feature_layer=means)
    assert model.feature_layer == means
    torch.testing.assert_close(model.features(x), x.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_naming_a_layer_the_model_lacks_is_an_error(files, fmt):
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(files[fmt], fmt, input_shape=INPUT_SHAPE, feature_layer="no_such_layer")
    assert caught.value.code == "unknown_layer"


def test_in_memory_network_is_hooked_at_features():
    model = wrap_module(ColourReader())
    x = torch.rand(3, *INPUT_SHAPE)
    assert model.feature_layer == "features"
    torch.testing.assert_close(model.features(x), x.mean(dim=(2, 3)))


# ---- safetensors of a built-in network -------------------------------------------------------

def test_safetensors_weights_of_a_builtin_mlp_load_with_features(tmp_path):
    from starvation.networks import build_network

    torch.manual_seed(0)
    network = build_network("mlp", {"hidden": [16, 8]}, INPUT_SHAPE, 1).eval()
    path = tmp_path / "mlp.safetensors"
    save_file(network.state_dict(), str(path))
    info = validate_checkpoint(path, "safetensors", arch="mlp", arch_params={"hidden": [16, 8]},
                               input_shape=INPUT_SHAPE, num_classes=2, max_bytes=MAX_BYTES)
    assert info["output_shape"] == [2, 1]
    model = load_checkpoint(path, "safetensors", arch="mlp", arch_params={"hidden": [16, 8]},
                            input_shape=INPUT_SHAPE, num_outputs=1)
    x = torch.rand(4, *INPUT_SHAPE)
    torch.testing.assert_close(model.logits(x), network(x))
    assert model.feature_layer == "features" and model.features(x).shape == (4, 8)

    expect_error("load_failed", path, "safetensors", arch="mlp", arch_params={"hidden": [32]})
    expect_error("missing_arch", path, "safetensors")


def test_safetensors_from_our_export_need_no_arch_it_is_in_the_header(tmp_path):
    from starvation.checkpoints.save import save_checkpoint
    from starvation.networks import build_network

    torch.manual_seed(0)
    network = build_network("mlp", {"hidden": [12]}, INPUT_SHAPE, 1)
    saved = save_checkpoint(network, tmp_path, seed=0, arch="mlp", arch_params={"hidden": [12]},
                            input_shape=INPUT_SHAPE, num_outputs=1)
    info = validate_checkpoint(saved.safetensors_path, "safetensors", num_classes=2, max_bytes=MAX_BYTES)
    assert (info["arch"], info["arch_params"], info["input_shape"]) == ("mlp", {"hidden": [12]}, list(INPUT_SHAPE))
    model = load_checkpoint(saved.safetensors_path, "safetensors")
    x = torch.rand(3, *INPUT_SHAPE)
    torch.testing.assert_close(model.logits(x), network.eval()(x))
    # the TorchScript twin of the same export exposes the same feature layer
    scripted = load_checkpoint(saved.torchscript_path, "torchscript", input_shape=INPUT_SHAPE)
    torch.testing.assert_close(scripted.features(x), model.features(x))


def test_safetensors_with_a_malformed_header_fails_to_load(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 400]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    expect_error("load_failed", path, "safetensors", arch="mlp", arch_params={"hidden": [4]})


# ---- files that are refused ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "safetensors"])
def test_a_pickle_is_refused_and_never_unpickled(tmp_path, fmt):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(PickleBomb(marker)))
    error = expect_error("bad_format", path, fmt, arch="mlp")
    assert "pickle" in error.message
    with pytest.raises(CheckpointError):
        load_checkpoint(path, fmt, input_shape=INPUT_SHAPE, arch="mlp", num_outputs=1)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the bomb is live: unpickling it would have made the marker
    assert marker.exists()


def test_a_torch_save_checkpoint_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "state.pt"
    torch.save({"weights": torch.zeros(2), "bomb": PickleBomb(marker)}, str(path))
    error = expect_error("bad_format", path, "torchscript")
    assert "torch.save" in error.message
    assert not marker.exists()


def test_a_truncated_torchscript_archive_fails_to_load(files, tmp_path):
    data = files["torchscript"].read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    expect_error("load_failed", path, "torchscript")


def test_an_onnx_file_declared_as_torchscript_is_a_mismatch(files):
    error = expect_error("format_mismatch", files["onnx"], "torchscript")
    assert "onnx" in error.message


def test_a_torchscript_file_declared_as_onnx_is_a_mismatch(files):
    expect_error("format_mismatch", files["torchscript"], "onnx")


def test_an_onnx_model_whose_input_does_not_fit_the_data_is_refused(files):
    error = expect_error("bad_input_shape", files["onnx_flat_input"], "onnx")
    assert "392" in error.message


def test_a_torchscript_model_that_cannot_take_the_input_is_refused(files):
    expect_error("bad_input_shape", files["torchscript"], "torchscript", input_shape=(3, 5))


def test_an_output_that_is_neither_one_logit_nor_one_per_class_is_refused(files):
    expect_error("bad_output_shape", files["three_outputs"], "torchscript", num_classes=2)
    info = validate_checkpoint(files["three_outputs"], "torchscript", input_shape=INPUT_SHAPE, num_classes=3,
                               max_bytes=MAX_BYTES)
    assert info["output_shape"] == [2, 3]


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    expect_error("empty_file", path, "onnx")


def test_a_file_over_the_size_limit_is_refused(files):
    expect_error("too_large", files["torchscript"], "torchscript", max_bytes=100)


def test_a_zip_that_unpacks_beyond_the_limit_is_refused(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m/code/__torch__.py", b"\0" * (4 * MAX_BYTES))
        archive.writestr("m/constants.pkl", b"")
        archive.writestr("m/data.pkl", b"")
    assert path.stat().st_size < MAX_BYTES
    expect_error("too_large", path, "torchscript")


def test_unknown_bytes_are_refused(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"hello, this is not a model\n" * 10)
    expect_error("bad_format", path, "onnx")


def test_an_unknown_format_name_is_refused(files):
    expect_error("bad_format", files["torchscript"], "pickle")
