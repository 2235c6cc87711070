"""What the audit sees of a model: `AuditableModel`, for torch modules, TorchScript and ONNX, and feature layers."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from starvation.checkpoints import graph, onnx_graph
from starvation.checkpoints.errors import CheckpointError, first_line

DEFAULT_FEATURE_LAYER = "features"  # the built-in networks' penultimate representation

_ONNX_INPUT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


# --------------------------------------------------------------------------------------------
# What the audit sees of a model
# --------------------------------------------------------------------------------------------


class AuditableModel:
    """A trained classifier as the audit sees it.

    `logits(x)` is [N, 1] for a binary model (one logit, also where the model returns [N]) and [N, k] for k
    classes; read before a final sigmoid or softmax that the model's graph applies. `features(x)` is the
    penultimate representation flattened to [N, d], or None when no layer is reachable; then
    `no_features_reason` says why. `head_site` is the head a graph reading found (foreign models), else None.
    Inputs may live on any device; outputs come back on the input's device.
    """

    format: str
    feature_layer: str | None
    no_features_reason: str | None
    head_site: graph.HeadSite | None = None

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> AuditableModel:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def head_description(self) -> dict | None:
        """Which node is the head, which tensor the features, the output form (`HeadSite.describe`); None where no
        graph was read."""
        return self.head_site.describe() if self.head_site is not None else None

    def random_copy(self, seed: int) -> AuditableModel | None:
        """The same network with fresh random weights (the linear probe's baseline), or None where
        the weights cannot be reached (ONNX, a model run in the jail)."""
        return None


FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


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
        logits_fn: FeatureFn | None = None,
        head_site: graph.HeadSite | None = None,
    ) -> None:
        self.module = module.eval()
        self.format = fmt
        self._feature_fn = feature_fn
        self._logits_fn = logits_fn  # None: the module's output are its logits
        self.head_site = head_site
        self.feature_layer = feature_layer if feature_fn is not None else None
        self.no_features_reason = None if feature_fn is not None else no_features_reason
        self._device = _module_device(module)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> TorchModel:
        self._device = torch.device(device)
        self.module.to(self._device)
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = x.to(self._device)
            out = self.module(x) if self._logits_fn is None else self._logits_fn(self.module, x)
        return _as_logits(out).to(x.device)

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._feature_fn is None:
            return None
        with torch.no_grad():
            out = self._feature_fn(self.module, x.to(self._device))
        return out.flatten(1).to(x.device)

    def random_copy(self, seed: int) -> TorchModel:
        module = copy.deepcopy(self.module)
        on_cpu = self._device.type == "cpu"
        module = module if on_cpu else module.cpu()  # re-initialised on the CPU: one RNG to seed, on any device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _reinitialise(module)
        copied = TorchModel(
            module,
            fmt=self.format,
            feature_fn=self._feature_fn,
            feature_layer=self.feature_layer,
            no_features_reason=self.no_features_reason,
            logits_fn=self._logits_fn,
            head_site=self.head_site,
        )
        return copied if on_cpu else copied.to(self._device)


def _reinitialise(module: nn.Module) -> None:
    """Fresh weights: each layer's own `reset_parameters` where it has one (PyTorch's defaults), else
    nn.Linear's default for matrices, zero biases and unit scales (TorchScript layers)."""
    for layer in module.modules():
        reset = getattr(layer, "reset_parameters", None)
        if callable(reset) and not isinstance(layer, torch.jit.ScriptModule):
            reset()
            continue
        with torch.no_grad():
            for name, parameter in layer.named_parameters(recurse=False):
                if parameter.dim() >= 2:
                    nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))
                elif name.endswith("bias"):
                    parameter.zero_()
                else:
                    parameter.fill_(1.0)


class OnnxModel(AuditableModel):
    """An ONNX model run by onnxruntime on CPU; the feature layer is an intermediate tensor: the one named, or by
    default the input of the linear map that makes the logits (`onnx_graph.read_onnx_graph`)."""

    format = "onnx"

    def __init__(self, proto, *, feature_layer: str | None = None) -> None:
        import onnx
        import onnxruntime as ort

        self.proto = proto  # as uploaded: what a repair rewrites
        self._logit_name = proto.graph.output[0].name
        self.no_features_reason = None
        self.found: onnx_graph.OnnxGraph | None = None
        try:
            self.found = onnx_graph.read_onnx_graph(proto.graph)
        except graph.NoHead as exc:
            self.no_features_reason = f"{exc}; name an intermediate tensor (feature_layer) to probe it"
        else:
            self._logit_name, self.head_site = self.found.logits_tensor, self.found.site
            feature_layer = feature_layer or self.found.features_tensor
        self.feature_layer = feature_layer
        extra = [name for name in (feature_layer, self._logit_name) if name is not None]
        if feature_layer is not None:
            produced = {out for node in proto.graph.node for out in node.output}
            if feature_layer not in produced:
                raise CheckpointError(
                    "unknown_layer",
                    f"The ONNX graph has no tensor named {feature_layer!r}.",
                )
        missing = [name for name in dict.fromkeys(extra) if name not in {o.name for o in proto.graph.output}]
        if missing:  # graph surgery on a copy: the features (and the logits before a sigmoid) become outputs
            proto = _copy_proto(proto)
            proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in missing)

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CheckpointError(
                "load_failed", "onnxruntime could not load the model.", detail=first_line(exc)
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

    def to(self, device: str | torch.device) -> OnnxModel:
        return self  # runs on onnxruntime's CPU provider; inputs and outputs are moved per call

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return _as_logits(self._run(x, self._logit_name))

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.feature_layer is None:
            return None
        out = self._run(x, self.feature_layer)
        found = self.found
        if found is not None and found.site.features_transposed and self.feature_layer == found.features_tensor:
            out = out.T
        return out.flatten(1)

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
            module,
            fmt="module",
            feature_fn=None,
            feature_layer=None,
            no_features_reason=f"the model has no submodule named {layer!r}",
        )
    return TorchModel(module, fmt="module", feature_fn=_hooked(layer), feature_layer=layer)


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
            f"The TorchScript model has no top-level submodule named {layer!r} (it has {sorted(children)}).",
        )
    if layer in children and "head" in children and layer != "head":

        def features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return getattr(m, layer)(x)

        def rest(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
            return m.get_submodule("head")(h)
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
        return (
            None,
            None,
            (
                f"TorchScript modules cannot be hooked, and this one has no top-level "
                f"{layer!r} and 'head' (nor is it an nn.Sequential) to read a feature layer from"
            ),
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
        return (
            None,
            None,
            (
                f"calling {layer!r} and then the rest of the model does not reproduce the model's "
                "output, so its output is not known to be the penultimate representation"
            ),
        )
    return features, layer, None


def script_model(
    module: torch.jit.ScriptModule, feature_layer: str | None, input_shape: tuple[int, ...] | None
) -> TorchModel:
    """A TorchScript model as the audit sees it: its features and head read from its graph
    (`graph.read_script_graph`), or from the top-level submodule the caller named."""
    try:
        found = graph.read_script_graph(module)
    except graph.NoHead as exc:
        if feature_layer is None:
            return TorchModel(
                module,
                fmt="torchscript",
                feature_fn=None,
                feature_layer=None,
                no_features_reason=f"{exc}; name a top-level submodule (feature_layer) to probe it",
            )
        found = None
    logits = found.logits_fn if found is not None else None
    logits_fn = None if logits is None else lambda m, x: logits(m._c, x)
    head_site = found.site if found is not None else None
    if feature_layer is None and found is not None:  # (no head found and no layer named: returned above)
        features_fn = found.features_fn
        return TorchModel(
            module,
            fmt="torchscript",
            feature_fn=lambda m, x: features_fn(m._c, x),
            feature_layer=found.site.features,
            head_site=head_site,
            logits_fn=logits_fn,
        )
    feature_fn, layer, reason = _script_feature_fn(module, feature_layer, input_shape)
    return TorchModel(
        module,
        fmt="torchscript",
        feature_fn=feature_fn,
        feature_layer=layer,
        no_features_reason=reason,
        head_site=head_site,
        logits_fn=logits_fn,
    )


def _as_logits(out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise CheckpointError(
            "bad_output_shape",
            f"The model returned {type(out).__name__}, not a tensor of logits.",
        )
    return (out.unsqueeze(1) if out.dim() == 1 else out).float()  # one logit per example, as [N]


def _hooked(layer: str) -> FeatureFn:
    def features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = module.get_submodule(layer).register_forward_hook(lambda _m, _inputs, output: captured.append(output))
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
