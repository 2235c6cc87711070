"""The jailed child: `python -m jail.child REQUESTS REPLIES PARENT_PID`.

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
    from starvation import checkpoints
    from starvation.checkpoints import CheckpointError, load_checkpoint, validate_checkpoint

MAX_INPUT_BYTES = 1 << 32


def main(requests: int, replies: int, parent_pid: int) -> None:
    from pathlib import Path

    lockdown.die_with_parent(parent_pid)
    first, _ = wire.receive(requests, max_payload=0)
    limits = lockdown.Limits(**first["limits"])
    torch.set_num_threads(limits.threads)
    _warm_up()
    data = Path(first["path"]).read_bytes()
    try:
        layers = lockdown.apply(limits, root=".")
    except Exception as exc:
        wire.send(replies, {"ok": False, "code": "jail_unavailable", "detail": str(exc)[:300]})
        return
    try:
        if first["op"] == "validate":
            info = validate_checkpoint(data, first["format"], **first["options"])
            wire.send(replies, {"ok": True, "info": info, "jail": layers})
            return
        model = load_checkpoint(data, first["format"], **first["options"])
        del data
        wire.send(replies, {
            "ok": True, "jail": layers, "feature_layer": model.feature_layer,
            "no_features_reason": model.no_features_reason,
        })
        while True:
            request, tensors = wire.receive(requests, max_payload=MAX_INPUT_BYTES)
            if request.get("op") not in ("logits", "features"):
                return
            x = tensors["x"]
            y = model.logits(x) if request["op"] == "logits" else model.features(x)
            wire.send(replies, {"ok": True}, {"y": y} if y is not None else None)
    except CheckpointError as exc:
        wire.send(replies, {"ok": False, "code": exc.code, "message": exc.message, "detail": exc.detail})
    except BaseException as exc:  # whatever the model did: a code and its type, never its words
        code = "memory_limit" if checkpoints.out_of_memory(exc) else "model_failed"
        wire.send(replies, {"ok": False, "code": code, "exception": type(exc).__name__,
                            "detail": str(exc)[:300]})


def _warm_up() -> None:
    """Start torch's thread pool and the lazily imported parts of a forward pass and of the
    probes while imports still work."""
    x = torch.rand(64, 64)
    (x @ x).relu().sum().item()
    torch.nn.functional.linear(x, x).softmax(1)
    checkpoints.wrap_module(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))).logits(
        torch.zeros(2, 4)
    )
    from safetensors.torch import load, save

    load(save({"x": x}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
