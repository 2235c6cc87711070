"""The jailed child: `python -m jail.child REQUESTS REPLIES`, started inside bubblewrap (jail/bwrap.py).

It imports everything it will need, reads the first request (which model file, which
operation, the limits) and the model's bytes, locks itself down (jail/lockdown.py), and only
then loads the model and runs it. After the lockdown it cannot open any file or socket, so a
hostile model finds nothing to read, write or call; what it prints goes to a pipe that the
service logs escaped.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the lockdown forbids imports later: take everything now
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch

    from jail import lockdown, wire
    from starvation import checkpoints, repair
    from starvation.checkpoints import CheckpointError, load_checkpoint, validate_checkpoint
    from starvation.errors import SpecError
    from starvation.repair import finetune

MAX_INPUT_BYTES = 1 << 32


def main(requests: int, replies: int) -> None:
    from pathlib import Path

    lockdown.die_with_parent()
    first, _ = wire.receive(requests, max_payload=0)
    limits = lockdown.Limits(**first["limits"])
    torch.set_num_threads(limits.threads)
    _warm_up(repairs=bool(first.get("repair")))
    data = Path(first["path"]).read_bytes()
    try:
        layers = lockdown.apply(limits)
    except Exception as exc:
        wire.send(replies, {"ok": False, "code": "jail_unavailable", "detail": str(exc)[:300]})
        return
    # Started and locked down: the model's own time (its wall-clock limit) starts now.
    wire.send(replies, {"ok": True, "jail": layers})
    try:
        if first["op"] == "validate":
            info = validate_checkpoint(data, first["format"], **first["options"])
            wire.send(replies, {"ok": True, "info": info})
            return
        model = load_checkpoint(data, first["format"], **first["options"])
        del data
        wire.send(
            replies,
            {
                "ok": True,
                "feature_layer": model.feature_layer,
                "no_features_reason": model.no_features_reason,
                "head": model.head_site.describe() if model.head_site is not None else None,
            },
        )
        uploaded, tuning = None, None  # the weights as uploaded and the running fine-tuning, for finetune_sd
        while True:
            request, tensors = wire.receive(requests, max_payload=MAX_INPUT_BYTES)
            op = request.get("op")
            if op in ("logits", "features"):
                x = tensors["x"]
                y = model.logits(x) if op == "logits" else model.features(x)
                wire.send(replies, {"ok": True}, {"y": y} if y is not None else None)
            elif op == "head":  # the weights of the linear map the graph reading found, for a repair
                head = repair.read_model_head(model)
                wire.send(replies, {"ok": True}, {"weight": head.weight, "bias": head.bias})
            elif op == "replace_head":  # new head weights in, written where they were read; the model file out
                _send_model(
                    replies, repair.replace_model_head(model, repair.LinearHead(tensors["weight"], tensors["bias"]))
                )
            elif op == "finetune":  # a finetune_sd candidate starts, from the weights the model was uploaded with
                module = _module_of(model)
                uploaded = uploaded or [t.detach().clone() for t in _weights(module)]
                with torch.no_grad():
                    for tensor, value in zip(_weights(module), uploaded, strict=True):
                        tensor.copy_(value)
                tuning = finetune.Finetuning(
                    module,
                    tensors["x"],
                    tensors["y"],
                    sd_lambda=float(request["sd_lambda"]),
                    lr=float(request["lr"]),
                    batch_size=request["batch_size"],
                    seed=int(request["seed"]),
                )
                wire.send(replies, {"ok": True})
            elif op == "finetune_steps":
                if tuning is None:
                    raise CheckpointError("invalid_request", "finetune_steps came before finetune.")
                wire.send(replies, {"ok": True, "loss": tuning.run(int(request["steps"]))})
            elif op == "model":  # the (fine-tuned) model, serialised
                _send_model(replies, repair.torchscript_bytes(_module_of(model)))
            else:
                return
    except CheckpointError as exc:
        wire.send(replies, {"ok": False, "code": exc.code, "message": exc.message, "detail": exc.detail})
    except repair.NoLinearHead as exc:
        wire.send(replies, {"ok": False, "code": "no_linear_head", "message": str(exc)})
    except SpecError as exc:
        wire.send(replies, {"ok": False, "code": "invalid_head", "message": str(exc)})
    except BaseException as exc:  # whatever the model did: a code and its type, never its words
        code = "memory_limit" if checkpoints.out_of_memory(exc) else "model_failed"
        wire.send(replies, {"ok": False, "code": code, "exception": type(exc).__name__, "detail": str(exc)[:300]})


def _module_of(model):
    """The TorchScript module behind a loaded model; an ONNX graph has none to train."""
    module = getattr(model, "module", None)
    if not isinstance(module, torch.jit.ScriptModule):
        raise repair.NoLinearHead("only TorchScript models can be trained in the jail")
    return module


def _weights(module) -> list:
    return [*module.parameters(), *module.buffers()]


def _send_model(replies: int, data: bytes) -> None:
    wire.send(replies, {"ok": True}, {"model": torch.frombuffer(bytearray(data), dtype=torch.uint8)})


def _warm_up(repairs: bool = False) -> None:
    """Start torch's thread pool and the lazily imported parts of a forward pass and of the
    probes (and, for a repair, of TorchScript's writer) while imports still work."""
    x = torch.rand(64, 64)
    (x @ x).relu().sum().item()
    torch.nn.functional.linear(x, x).softmax(1)
    checkpoints.wrap_module(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))).logits(torch.zeros(2, 4))
    from safetensors.torch import load, save

    load(save({"x": x}))
    if repairs:  # TorchScript's writer; a fine-tuning's autograd, Adam and minibatch draw
        scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)))
        repair.torchscript_bytes(scripted)
        finetune.Finetuning(
            scripted, torch.rand(4, 4), torch.tensor([0, 1, 0, 1]), sd_lambda=1.0, lr=1e-3, batch_size=2, seed=0
        ).run(3)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
