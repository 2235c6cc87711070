"""Built-in networks, and checkpoints that reload to the very same logits."""
from __future__ import annotations

import math
import pathlib

import pytest
import torch
from torch import nn

from starvation import SpecError
from starvation.checkpoints.save import load_builtin, load_torchscript, save_checkpoint
from starvation.networks import ARCHS, build_network


def test_mlp_is_the_papers_392_300_300_1_with_xavier_weights_and_zero_biases() -> None:
    torch.manual_seed(0)
    net = build_network("mlp", {"hidden": [300, 300]}, (2, 14, 14), 1)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(392, 300), (300, 300), (300, 1)]
    for layer in linears:
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        largest = float(layer.weight.detach().abs().max())
        assert 0.9 * bound < largest <= bound
        assert torch.all(layer.bias == 0)
    assert isinstance(net.features, nn.Sequential) and isinstance(net.features[-1], nn.ReLU)
    assert net.head is linears[-1]
    x = torch.rand(5, 2, 14, 14)
    assert net(x).shape == (5, 1) and net.features(x).shape == (5, 300)


def test_every_arch_exposes_features_and_head_and_gives_k_logits_for_k_classes() -> None:
    assert set(ARCHS) == {"mlp", "cnn", "resnet18", "resnet50"}
    for arch, shape in (("mlp", (3, 8, 8)), ("cnn", (3, 8, 8)), ("cnn", (2, 14, 14)), ("mlp", (2,))):
        if arch == "cnn" and len(shape) != 3:
            continue
        net = build_network(arch, {}, shape, 4)
        assert isinstance(net.features, nn.Sequential) and isinstance(net.head, nn.Linear)
        assert net(torch.rand(3, *shape)).shape == (3, 4)
        assert net.head(net.features(torch.rand(3, *shape))).shape == (3, 4)


@pytest.mark.parametrize("arch, params, shape, message", [
    ("resnet", {}, (2,), "unknown arch 'resnet'"),
    ("mlp", {"hidden": [0]}, (2,), "hidden"),
    ("mlp", {"hidden": 300}, (2,), "hidden"),
    ("mlp", {"depth": 3}, (2,), "no parameter 'depth'"),
    ("cnn", {}, (2,), "image inputs"),
])
def test_bad_architectures_are_spec_errors(arch: str, params: dict, shape: tuple, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build_network(arch, params, shape, 1)


@pytest.mark.parametrize("arch, params, shape, outputs", [
    ("mlp", {"hidden": [16, 8]}, (2, 14, 14), 1),
    ("cnn", {"channels": [4, 8]}, (3, 10, 10), 3),
])
def test_checkpoints_reload_to_identical_logits(tmp_path: pathlib.Path, arch: str, params: dict, shape: tuple,
                                                outputs: int) -> None:
    torch.manual_seed(1)
    net = build_network(arch, params, shape, outputs)
    with torch.no_grad():  # move off the initialisation so zero biases cannot hide a missing tensor
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.eval()
    checkpoint = save_checkpoint(net, tmp_path, seed=7, arch=arch, arch_params=params, input_shape=shape,
                                 num_outputs=outputs)
    assert checkpoint.safetensors_path == tmp_path / "seed7.safetensors"
    assert checkpoint.torchscript_path == tmp_path / "seed7.torchscript.pt"
    x = torch.rand(6, *shape)
    with torch.no_grad():
        expected = net(x)
        from_weights = load_builtin(checkpoint.safetensors_path, arch, params, shape, outputs)(x)
        from_script = load_torchscript(checkpoint.torchscript_path)(x)
    assert torch.equal(from_weights, expected)
    assert torch.equal(from_script, expected)
    assert checkpoint.to_dict()["safetensors_path"] == str(tmp_path / "seed7.safetensors")


def test_weights_that_do_not_fit_the_arch_are_a_spec_error(tmp_path: pathlib.Path) -> None:
    net = build_network("mlp", {"hidden": [16]}, (4,), 1)
    checkpoint = save_checkpoint(net, tmp_path, seed=0, arch="mlp", arch_params={"hidden": [16]}, input_shape=(4,),
                                 num_outputs=1)
    with pytest.raises(SpecError, match="do not fit"):
        load_builtin(checkpoint.safetensors_path, "mlp", {"hidden": [32]}, (4,), 1)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SpecError, match="safetensors"):
        load_builtin(tmp_path / "junk.safetensors", "mlp", {"hidden": [16]}, (4,), 1)
