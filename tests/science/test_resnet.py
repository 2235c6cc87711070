"""resnet18 / resnet50: torchvision's structure, names and sizes; torchvision-named weights in; the budget's counts."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from starvation import budget, networks, weights
from starvation.checkpoints import load_builtin, load_checkpoint
from starvation.ensemble import unsupported_reason
from starvation.errors import SpecError
from starvation.params import ParamError
from starvation.training import resolve_train_spec

# torchvision.models.resnet18() / resnet50() at 1000 classes (torchvision's own model table)
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "resnet50": 25_557_032}
TORCHVISION_STATE_KEYS = {"resnet18": 122, "resnet50": 320}  # len(model.state_dict())


def torchvision_keys(arch: str) -> list[str]:
    """torchvision's state-dict keys, in order, written out from the published structure (not from our code)."""
    bottleneck, blocks = {"resnet18": (False, (2, 2, 2, 2)), "resnet50": (True, (3, 4, 6, 3))}[arch]

    def bn(prefix: str) -> list[str]:
        return [f"{prefix}.{name}" for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = ["conv1.weight", *bn("bn1")]
    for stage, count in enumerate(blocks, start=1):
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            for conv in range(1, 4 if bottleneck else 3):
                keys += [f"{prefix}.conv{conv}.weight", *bn(f"{prefix}.bn{conv}")]
            if block == 0 and (stage > 1 or bottleneck):  # stride 2, or 64 -> 256 channels
                keys += [f"{prefix}.downsample.0.weight", *bn(f"{prefix}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


def to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys renamed back to torchvision's (written here, independently of the code under test)."""
    renamed = {}
    for key, tensor in state.items():
        if key.startswith("head."):
            renamed["fc." + key[len("head."):]] = tensor
        else:
            assert key.startswith("features.")
            renamed[key[len("features."):]] = tensor
    return renamed


def meta_network(arch: str, outputs: int = 1000, shape: tuple = (3, 224, 224), **params) -> networks.Network:
    with torch.device("meta"):
        return networks.build_network(arch, params, shape, outputs)


def trained_looking(arch: str, shape: tuple, outputs: int, seed: int) -> networks.Network:
    """A narrow network whose every tensor (BatchNorm statistics included) is off its initial value, in eval mode."""
    torch.manual_seed(seed)
    network = networks.build_network(arch, NARROW, shape, outputs)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn_like(tensor))
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.5)
            else:
                tensor.fill_(seed + 3)  # num_batches_tracked
    return network.eval()


# ---- structure, names and sizes --------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_parameter_counts_are_torchvisions(arch: str) -> None:
    network = meta_network(arch)
    assert sum(p.numel() for p in network.parameters()) == TORCHVISION_PARAMETERS[arch]
    assert networks.parameter_count(arch, {}, (3, 224, 224), 1000) == TORCHVISION_PARAMETERS[arch]
    assert networks.parameter_count(arch, None, (3, 32, 32), 1000) == TORCHVISION_PARAMETERS[arch]  # no spatial term
    assert networks.check_arch_params(arch, None, input_shape=(3, 224, 224), num_outputs=1000) == {"width": 64}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_state_dict_keys_are_torchvisions_under_features_and_head(arch: str) -> None:
    expected = torchvision_keys(arch)
    assert len(expected) == TORCHVISION_STATE_KEYS[arch]
    ours = list(meta_network(arch).state_dict())
    assert to_torchvision(dict.fromkeys(ours)).keys() == set(expected)
    assert list(to_torchvision(dict.fromkeys(ours))) == expected  # the same order too
    assert ours[0] == "features.conv1.weight" and ours[-2:] == ["head.weight", "head.bias"]


def test_the_layers_are_torchvisions() -> None:
    r18, r50 = meta_network("resnet18"), meta_network("resnet50")
    assert [name for name, _ in r18.features.named_children()] == [
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten"]
    conv1 = r18.features.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((7, 7), (2, 2), (3, 3), None)
    pool = r18.features.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    shapes18 = {k: list(v.shape) for k, v in r18.state_dict().items()}
    assert shapes18["features.layer2.0.downsample.0.weight"] == [128, 64, 1, 1]
    assert shapes18["features.layer4.1.conv2.weight"] == [512, 512, 3, 3]
    assert shapes18["head.weight"] == [1000, 512]
    block = r50.features.layer2[0]  # v1.5: the stride is on the 3x3 conv
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.downsample[0].stride == (2, 2)
    shapes50 = {k: list(v.shape) for k, v in r50.state_dict().items()}
    assert shapes50["features.layer1.0.downsample.0.weight"] == [256, 64, 1, 1]
    assert shapes50["features.layer4.2.conv3.weight"] == [2048, 512, 1, 1]
    assert shapes50["head.weight"] == [1000, 2048]
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None for m in r50.modules())


def test_initialisation_is_torchvisions() -> None:
    torch.manual_seed(0)
    network = networks.build_network("resnet18", {}, (3, 32, 32), 10)
    conv = network.features.layer3[0].conv1  # kaiming normal, fan_out, relu: std sqrt(2 / (256 * 3 * 3))
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    bns = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bns)
    bound = 1 / math.sqrt(512)  # nn.Linear's default
    assert float(network.head.weight.detach().abs().max()) <= bound
    assert float(network.head.bias.detach().abs().max()) <= bound


@pytest.mark.parametrize("arch, width, shape, outputs", [
    ("resnet18", 64, (3, 64, 64), 1), ("resnet18", 16, (3, 32, 32), 5), ("resnet50", 8, (3, 32, 32), 1),
    ("resnet18", 16, (2, 14, 14), 5), ("resnet18", 8, (1, 8, 9), 1),
])
def test_forward_gives_one_logit_per_output_and_features_for_the_audit(arch, width, shape, outputs) -> None:
    network = networks.build_network(arch, {"width": width}, shape, outputs).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert network(x).shape == (2, outputs)
        features = network.features(x)
    assert features.shape == (2, 8 * width * (4 if arch == "resnet50" else 1))
    assert torch.equal(network.head(features), network(x))


@pytest.mark.parametrize("shape, message", [((3, 7, 32), "at least 8x8"), ((2,), "image inputs"),
                                            ((3, 32), "image inputs")])
def test_inputs_a_resnet_cannot_take_are_spec_errors(shape, message) -> None:
    with pytest.raises(SpecError, match=message):
        networks.build_network("resnet18", {}, shape, 1)
    with pytest.raises(SpecError, match=message):  # refused at submit too: the budget counts with the shape
        networks.check_arch_params("resnet18", {}, input_shape=shape)


# ---- the budget's counts ---------------------------------------------------------------------

@pytest.mark.parametrize("arch, width, shape, outputs", [
    ("resnet18", 64, (3, 32, 32), 1), ("resnet18", 16, (2, 14, 14), 7), ("resnet18", 5, (1, 33, 17), 2),
    ("resnet50", 64, (3, 224, 224), 1000), ("resnet50", 16, (3, 40, 24), 3),
])
def test_parameter_and_activation_counts_agree_with_the_built_network(arch, width, shape, outputs) -> None:
    network = meta_network(arch, outputs, shape, width=width)
    assert networks.parameter_count(arch, {"width": width}, shape, outputs) == sum(
        p.numel() for p in network.parameters())
    kept = []  # per example: conv and BatchNorm outputs, the max-pool's (and its int64 indices), features, logits

    def hook(module, _inputs, output) -> None:
        per_example = output[0].numel()
        kept.append(3 * per_example if isinstance(module, nn.MaxPool2d) else per_example)

    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.Flatten, nn.Linear)):
            module.register_forward_hook(hook)
    with torch.no_grad():
        assert network.eval()(torch.empty(1, *shape, device="meta")).shape == (1, outputs)
    assert networks.activation_count(arch, {"width": width}, shape, outputs) == sum(kept)


def test_a_pass_without_gradients_is_counted_apart() -> None:
    # a ResNet frees each layer's output as it goes: far less than what backward keeps, and more than one layer's
    held = networks.inference_count("resnet18", {}, (3, 64, 64), 1)
    assert 2 * 64 * 32 * 32 < held < networks.activation_count("resnet18", {}, (3, 64, 64), 1) / 3
    assert networks.inference_count("mlp", {"hidden": [7]}, (3,), 2) == networks.activation_count(
        "mlp", {"hidden": [7]}, (3,), 2)  # other archs: all of it, an upper bound


def test_arch_params_are_bounded_and_named() -> None:
    assert networks.check_arch_params("resnet18", {"width": 128}, input_shape=(3, 64, 64)) == {"width": 128}
    with pytest.raises(ParamError, match="from 1 to 256") as error:
        networks.check_arch_params("resnet18", {"width": 512})
    assert error.value.field == "arch_params.width"
    with pytest.raises(ParamError, match="parameters") as error:  # resnet50 at 2x width: ~94M
        networks.check_arch_params("resnet50", {"width": 128}, input_shape=(3, 224, 224), num_outputs=1000)
    assert error.value.field == "arch_params.width"
    with pytest.raises(ParamError, match="no parameter 'depth'"):
        networks.check_arch_params("resnet50", {"depth": 101})


def test_a_resnet_train_spec_is_budgeted_and_trained_one_seed_at_a_time() -> None:
    spec = resolve_train_spec({"preset": "paper_cmnist_erm", "model": {"arch": "resnet18", "width": 8},
                               "seeds": [0, 1, 2]})
    assert spec["model"] == {"arch": "resnet18", "width": 8}
    assert budget.seeds_at_once(spec) == 1
    estimate = budget.check_train_budget(spec, 64 * 2**30, budget.data_size(spec, None))
    assert estimate.parts["parameters"] > 0 and estimate.parts["activations"] > 0
    with pytest.raises(budget.OverBudget) as error:
        budget.check_train_budget({**spec, "model": {"arch": "resnet18", "width": 64}}, 2**30,
                                  budget.data_size(spec, None))
    assert error.value.field in {"model.width", "batch_size", "dataset.params.n_train", "seeds"}
    assert unsupported_reason(meta_network("resnet18")) == (
        "layer features.conv1 is a Conv2d; only MLPs (Linear/ReLU) are batched")


# ---- weights with torchvision's names ----------------------------------------------------------
# At width 16 (1/16 of the parameters, the same 122 tensors under the same names) to keep the tests fast.

SHAPE = (3, 32, 32)
NARROW = {"width": 16}


def test_torchvision_named_weights_load_and_give_the_same_logits() -> None:
    source = trained_looking("resnet18", SHAPE, 5, seed=0)
    state = to_torchvision(source.state_dict())
    target = networks.build_network("resnet18", NARROW, SHAPE, 5)
    report = weights.load_initial_weights(target, state)
    assert report == {"names": "torchvision", "loaded": 122, "head": "loaded", "skipped": []}
    target.eval()
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    # our own names load the same way
    again = networks.build_network("resnet18", NARROW, SHAPE, 5)
    assert weights.load_initial_weights(again, source.state_dict())["names"] == "ours"
    with torch.no_grad():
        assert torch.equal(again.eval()(x), source(x))


def test_an_imagenet_head_is_left_out_and_the_backbone_loaded() -> None:
    imagenet = trained_looking("resnet18", SHAPE, 1000, seed=1)
    state = {k: v for k, v in to_torchvision(imagenet.state_dict()).items() if not k.endswith("num_batches_tracked")}
    torch.manual_seed(5)
    target = networks.build_network("resnet18", NARROW, SHAPE, 1)
    fresh_head = {k: v.clone() for k, v in target.head.state_dict().items()}
    report = weights.load_initial_weights(target, state)
    assert report["head"] == "fresh" and report["skipped"] == ["fc.weight", "fc.bias"]
    assert report["loaded"] == 122 - 2 - 20  # the head, and 20 num_batches_tracked (not in the file)
    assert all(torch.equal(v, fresh_head[k]) for k, v in target.head.state_dict().items())
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(target.eval().features(x), imagenet.features(x))
    assert target(x).shape == (2, 1)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.__setitem__("layer2.0.conv1.weight", torch.zeros(128, 64, 1, 1)), "'layer2.0.conv1.weight'"),
    (lambda s: s.pop("layer3.1.bn2.running_var"), "layer3.1.bn2.running_var"),
    (lambda s: s.__setitem__("layer5.0.conv1.weight", torch.zeros(1)), "'layer5.0.conv1.weight'"),
    (lambda s: s.__setitem__("features.conv1.weight", s["conv1.weight"]), "'conv1.weight' and 'features.conv1"),
])
def test_weights_that_do_not_fit_the_backbone_are_refused_naming_the_key(change, message) -> None:
    state = to_torchvision(meta_network("resnet18", 1000, SHAPE).state_dict())
    change(state)
    with pytest.raises(SpecError, match=message):
        weights.load_initial_weights(meta_network("resnet18", 1, SHAPE), state)


def test_safetensors_upload_with_torchvision_names_loads_as_the_arch() -> None:
    source = trained_looking("resnet18", SHAPE, 5, seed=2)
    data = safetensors_bytes({k: v.contiguous() for k, v in to_torchvision(source.state_dict()).items()})
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        expected = source(x)
        assert torch.equal(load_builtin(data, "resnet18", NARROW, SHAPE, 5)(x), expected)
    model = load_checkpoint(data, "safetensors", arch="resnet18", arch_params=NARROW, input_shape=SHAPE, num_outputs=5)
    assert torch.equal(model.logits(x), expected)
    assert model.feature_layer == "features" and model.features(x).shape == (4, 8 * 16)
    # an upload is the model itself: its head must fit (a 1000-class file is not a 5-class model)
    with pytest.raises(SpecError, match="do not fit"):
        load_builtin(data, "resnet18", NARROW, SHAPE, 1)


def test_training_starts_every_seed_from_torchvision_named_weights_with_a_fresh_head(tmp_path) -> None:
    from starvation.training import train
    from starvation.training.execution import init_network
    from starvation.training.resolved import ResolvedTrainSpec

    source = networks.build_network("resnet18", {"width": 8}, (2, 14, 14), 1000)  # an "ImageNet" head: 1000 classes
    given = {("fc." + k[len("head."):] if k.startswith("head.") else k[len("features."):]): v.clone()
             for k, v in source.state_dict().items()}
    spec = {"preset": "paper_cmnist_erm", "dataset": {"name": "colored_mnist", "params": {"n_train": 200}},
            "model": {"arch": "resnet18", "width": 8}, "steps": 2, "batch_size": 16, "eval_every": 2, "seeds": [0, 1]}
    outcome = train(spec, out_dir=tmp_path, init_weights=given)
    assert outcome.result["init"] == {"names": "torchvision", "loaded": 120, "head": "fresh",
                                      "skipped": ["fc.weight", "fc.bias"]}
    resolved = ResolvedTrainSpec.of(resolve_train_spec(spec))
    data = type("Data", (), {"input_shape": (2, 14, 14), "num_classes": 2})()
    first, second = (init_network(resolved, data, seed, given) for seed in (0, 1))
    assert torch.equal(first.features.layer3[1].conv2.weight, given["layer3.1.conv2.weight"])
    assert torch.equal(second.features.bn1.running_var, given["bn1.running_var"])
    assert first.head.weight.shape == (1, 64) and not torch.equal(first.head.weight, second.head.weight)


def test_a_resnet_refuses_minibatches_of_one() -> None:
    with pytest.raises(SpecError, match="batch_size must be at least 2"):
        resolve_train_spec({"preset": "paper_cmnist_erm", "model": {"arch": "resnet18"}, "batch_size": 1})
