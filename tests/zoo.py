"""A zoo of models written the way people write them, trained outside the project with plain PyTorch
(ERM on Colored MNIST, so each leans on colour), to audit and repair as TorchScript and as ONNX.

Each `ZooModel` names a style: where its head is, what it outputs ([N], [N, 1], [N, 2], probabilities).
`trained(name)` trains it (cached); `exported(name, fmt)` is its file's bytes. `REFUSED` are models whose
head a repair must not rewrite (tied, computed from the input); `hand_built_onnx` is a graph that another
framework could have written (MatMul + Add + Sigmoid, made with onnx.helper).
"""
from __future__ import annotations

import functools
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (2, 14, 14)
IN = 2 * 14 * 14
HIDDEN = 64
STEPS = 60  # full-batch Adam updates: the nets lean on colour, their hidden layers still hold the digit
N_TRAIN = 1000  # training digits for the tests; bench/zoo.py takes all 4,000


class TorchvisionStyle(nn.Module):
    """A conv trunk, pooling, `flatten`, then `self.fc` (torchvision's ResNet layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.fc = nn.Linear(8 * 7 * 7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.relu(self.conv1(x)))
        return self.fc(torch.flatten(x, 1))


class TimmHead(nn.Module):
    def __init__(self, width: int, outputs: int) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class TimmStyle(nn.Module):
    """`forward_features`, then `forward_head` with the classifier at `self.head.fc` behind dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = TimmHead(HIDDEN, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.stem(x.flatten(1))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class RawParameters(nn.Module):
    """The last layer on raw parameters, `x @ self.w.t() + self.b`, squeezed to [N]."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(IN, HIDDEN)
        self.w = nn.Parameter(torch.randn(1, HIDDEN) / HIDDEN ** 0.5)
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x.flatten(1)))
        return (h @ self.w.t() + self.b).squeeze(1)


class FunctionalLinear(nn.Module):
    """`F.linear` on weights kept as attributes, output [N, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(IN, HIDDEN)
        self.out_weight = nn.Parameter(torch.randn(1, HIDDEN) / HIDDEN ** 0.5)
        self.out_bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.hidden(x.view(x.shape[0], -1))), self.out_weight, self.out_bias)


class Addmm(nn.Module):
    """`torch.addmm(b, h, w)` with the weight stored [features, outputs]."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(IN, HIDDEN)
        self.w = nn.Parameter(torch.randn(HIDDEN, 1) / HIDDEN ** 0.5)
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, torch.relu(self.hidden(x.flatten(1))), self.w)


class NestedSequentials(nn.Module):
    """A plain module holding `self.net = nn.Sequential(...)` of Sequentials, with a `reshape` in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU()),
                                 nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))


class WithModuleDict(nn.Module):
    """Layers in an `nn.ModuleDict`, two-class logits [N, 2]."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({"body": nn.Linear(IN, HIDDEN), "classifier": nn.Linear(HIDDEN, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers["classifier"](torch.relu(self.layers["body"](x.flatten(1))))


class FinalSigmoid(nn.Module):
    """Deployed with its sigmoid: it outputs a probability [N, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(IN, HIDDEN), nn.ReLU())
        self.classifier = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.classifier(self.body(x)))


class FinalSoftmax(nn.Module):
    """Deployed with its softmax: it outputs probabilities [N, 2]."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(IN, HIDDEN), nn.ReLU())
        self.decoder = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.decoder(self.encoder(x)), dim=1)


class NormAndDropout(nn.Module):
    """LayerNorm and dropout before the head; one logit squeezed to [N] by `view`."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.norm = nn.LayerNorm(HIDDEN)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(self.mlp(x)))).view(-1)


class TransposedParameter(nn.Module):
    """`h @ self.W.T` (numpy-style transpose) plus a bias, two-class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(IN, HIDDEN)
        self.W = nn.Parameter(torch.randn(2, HIDDEN) / HIDDEN ** 0.5)
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.encoder(x.flatten(1))) @ self.W.T + self.bias


class VggStyle(nn.Module):
    """`self.features` (convolutions), `torch.flatten`, then `self.classifier`, a Sequential ending in Linear, Dropout
    between (torchvision's VGG/AlexNet layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(4 * 7 * 7, HIDDEN), nn.ReLU(), nn.Dropout(0.2), nn.Linear(HIDDEN, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# Refusals: a repair must not rewrite these heads.


class TiedWeights(nn.Module):
    """The head's weight is also the class embedding added to the features (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(IN, HIDDEN)
        self.classes = nn.Parameter(torch.randn(2, HIDDEN) / HIDDEN ** 0.5)
        self.b = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x.flatten(1))) + self.classes.mean(0)
        return F.linear(h, self.classes, self.b)


class HeadFromInput(nn.Module):
    """The head's weight is computed from the batch itself."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(IN, HIDDEN)
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x.flatten(1)))
        return h @ h.mean(0, keepdim=True).t() + self.b


@dataclass(frozen=True)
class ZooModel:
    build: Callable[[], nn.Module]
    output: str  # "logit" ([N] or [N, 1]), "logits2", "sigmoid" or "softmax": how it is trained
    opset: int  # the ONNX export's opset
    form: str  # the output form the graph reading must report


ZOO: dict[str, ZooModel] = {
    "torchvision_fc": ZooModel(TorchvisionStyle, "logit", 13, "one logit"),
    "timm_head_fc": ZooModel(TimmStyle, "logits2", 17, "two-class logits"),
    "raw_parameters": ZooModel(RawParameters, "logit", 13, "one logit"),
    "functional_linear": ZooModel(FunctionalLinear, "logit", 17, "one logit"),
    "addmm": ZooModel(Addmm, "logit", 13, "one logit"),
    "nested_sequentials": ZooModel(NestedSequentials, "logit", 17, "one logit"),
    "module_dict": ZooModel(WithModuleDict, "logits2", 13, "two-class logits"),
    "final_sigmoid": ZooModel(FinalSigmoid, "sigmoid", 17, "sigmoid probability of one logit"),
    "final_softmax": ZooModel(FinalSoftmax, "softmax", 13, "softmax probabilities of two-class logits"),
    "norm_and_dropout": ZooModel(NormAndDropout, "logit", 17, "one logit"),
    "transposed_parameter": ZooModel(TransposedParameter, "logits2", 13, "two-class logits"),
    "vgg_classifier": ZooModel(VggStyle, "logits2", 17, "two-class logits"),
}
REFUSED: dict[str, ZooModel] = {
    "tied_weights": ZooModel(TiedWeights, "logits2", 17, "two-class logits"),
    "head_from_input": ZooModel(HeadFromInput, "logit", 13, "logits"),
}


def loss_of(output: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if output == "logit":
        return F.binary_cross_entropy_with_logits(out.reshape(-1), y.float())
    if output == "sigmoid":
        return F.binary_cross_entropy(out.reshape(-1).clamp(1e-6, 1 - 1e-6), y.float())
    if output == "softmax":
        return F.nll_loss(out.clamp_min(1e-6).log(), y)
    return F.cross_entropy(out, y)


@functools.cache
def colored_mnist(n_train: int | None = N_TRAIN):
    """Colored MNIST with its first `n_train` training digits (None: all 4,000 of the bundled set)."""
    from starvation import datasets

    return datasets.build("colored_mnist", {"n_train": n_train}, seed=0, data_dir=None)


@functools.cache
def trained(name: str, n_train: int | None = N_TRAIN, seed: int = 0) -> nn.Module:
    """ERM, full batch, Adam, on the pooled training environments of Colored MNIST."""
    entry = {**ZOO, **REFUSED}[name]
    torch.manual_seed(seed)
    model = entry.build()
    train = colored_mnist(n_train).train_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(entry.output, model(train.x), train.y).backward()
        optimizer.step()
    return model.eval()


def torchscript_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def onnx_bytes(module: nn.Module, opset: int) -> bytes:
    """The legacy (TorchScript-based) exporter at `opset`, with a dynamic batch axis."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder) / "model.onnx"
        torch.onnx.export(module.eval(), (torch.zeros(1, *INPUT_SHAPE),), str(path), dynamo=False,
                          opset_version=opset, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        return path.read_bytes()


def exported(name: str, fmt: str, n_train: int | None = N_TRAIN) -> bytes:
    if name == "hand_built_onnx":
        return hand_built_onnx(n_train)
    entry = {**ZOO, **REFUSED}[name]
    module = trained(name, n_train)
    return torchscript_bytes(module) if fmt == "torchscript" else onnx_bytes(module, entry.opset)


@functools.cache
def hand_built_onnx(n_train: int | None = N_TRAIN) -> bytes:
    """An MLP written node by node as another framework exports it: Flatten, MatMul + Add, Relu, MatMul + Add,
    Sigmoid (a probability [N, 1]); the weights are those of `final_sigmoid`, trained here."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    module = trained("final_sigmoid", n_train)
    first, last = module.body[1], module.classifier
    weights = {"W1": first.weight.detach().T, "B1": first.bias.detach(), "W2": last.weight.detach().T,
               "B2": last.bias.detach()}
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "B1"], ["pre1"]),
        helper.make_node("Relu", ["pre1"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "W2"], ["mm2"]),
        helper.make_node("Add", ["mm2", "B2"], ["score"]),
        helper.make_node("Sigmoid", ["score"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes, "hand_built",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(value.contiguous().numpy(), name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hand")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


CASES = [(name, fmt) for name in ZOO for fmt in ("torchscript", "onnx")] + [("hand_built_onnx", "onnx")]


def flip_rate_and_accuracy(model, dataset) -> tuple[float, float]:
    """(colour-swap flip rate, accuracy) on the test split, predicted as the audit predicts."""
    from starvation.repair.fit import predicted_class

    test = dataset.splits[dataset.test_split]
    predicted = predicted_class(model.logits(test.x))
    swapped = predicted_class(model.logits(dataset.intervene(test).x))
    return float((predicted != swapped).double().mean()), float((predicted == test.y).double().mean())


@dataclass
class Repaired:
    model: object  # the repaired file, loaded again
    data: bytes  # the repaired file
    before: tuple[float, float]  # (flip rate, accuracy)
    after: tuple[float, float]


def repair_last_layer(data: bytes, fmt: str, n_train: int | None = N_TRAIN, method: dict | None = None) -> Repaired:
    """What a `last_layer` repair job does to a foreign model, in this process: the head found in the graph, the
    training features, the refit chosen on the training splits, written back where it was read; the file loaded
    again and checked to give the fitted head's logits. `method`: the job's spec section (default last_layer)."""
    from starvation.checkpoints import load_checkpoint
    from starvation.repair import (TrainingFeatures, build_repair_method, check_head_feeds_output, read_model_head,
                                   replace_model_head)

    dataset = colored_mnist(n_train)
    model = load_checkpoint(data, fmt, input_shape=INPUT_SHAPE)
    train = dataset.train_data()
    old = read_model_head(model)
    features = model.features(train.x)
    check_head_feeds_output(old, features[:256], model.logits(train.x[:256]))
    before = flip_rate_and_accuracy(model, dataset)
    refit = build_repair_method(method).repair(
        TrainingFeatures(features, train.y, train.attribute, list(dataset.train_splits)), old, seed=0)
    written = replace_model_head(model, refit.head)
    again = load_checkpoint(written, fmt, input_shape=INPUT_SHAPE)
    expected = refit.head.logits(features[:256].to(refit.head.weight.dtype)).float()
    assert torch.allclose(again.logits(train.x[:256]), expected, atol=1e-3, rtol=1e-3)
    return Repaired(again, written, before, flip_rate_and_accuracy(again, dataset))
