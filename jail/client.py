"""The service's side of the jail: start a child, hand it a model and inputs, read its answers.

Everything the child says is treated as untrusted: lengths are bounded (jail/wire.py), error
codes and messages are checked and cut before they reach a user, and what the model prints
is logged as one escaped field, never as a line of our own log.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from jail import bwrap, wire
from jail.lockdown import Limits
from starvation.checkpoints import AuditableModel
from starvation.errors import CodedError
from starvation.repair import LinearHead

log = logging.getLogger("gs.jail")

START_TIMEOUT_S = 120.0
OUTPUT_KEPT_BYTES = 4096
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_EXCEPTION = re.compile(r"^[A-Z][A-Za-z0-9_]{0,39}$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_MESSAGE_CHARS = 400
ANSWER_SLACK_BYTES = 1 << 20  # headers and small tensors on top of what a model's parameters can need


class JailError(CodedError):
    """A foreign model that failed, was refused, or broke a limit; `code` and `message` are
    safe to show to the model's owner."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class _Child:
    """One jailed process for one model. Never reused for another model or another tenant."""

    def __init__(
        self,
        path: str | Path,
        fmt: str,
        op: str,
        options: dict[str, Any],
        limits: Limits,
        wall_seconds: float,
        repair: bool = False,
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.limits, self.wall_seconds, self.interrupt = limits, wall_seconds, interrupt
        self.declared_bytes = declared_bytes(path, fmt)
        requests_r, self.requests = os.pipe()
        self.replies, replies_w = os.pipe()
        output_r, output_w = os.pipe()
        env = {
            "PATH": os.defpath,
            "PYTHONPATH": bwrap.INSIDE_ROOT,
            "PYTHONDONTWRITEBYTECODE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": str(limits.threads),
            **{k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")},
        }
        try:
            bwrap.check()
            argv = bwrap.command([sys.executable, "-m", "jail.child", str(requests_r), str(replies_w)], path, env)
            self.process = subprocess.Popen(
                argv,
                pass_fds=(requests_r, replies_w),
                stdin=subprocess.DEVNULL,
                stdout=output_w,
                stderr=output_w,
                cwd="/",
                env={"PATH": os.defpath},
                start_new_session=True,
            )
        except (bwrap.SandboxUnavailable, OSError) as exc:
            for fd in (self.requests, self.replies, output_r):
                os.close(fd)
            log.error("the jail could not start: %s", printable(str(exc)))
            raise JailError(
                "jail_unavailable", "Foreign models cannot be run safely on this server right now."
            ) from None
        finally:
            for fd in (requests_r, replies_w, output_w):
                os.close(fd)
        self.output = bytearray()
        self.drain = threading.Thread(target=self._drain, args=(output_r,), daemon=True)
        self.drain.start()
        first = {
            "op": op,
            "path": bwrap.MODEL_PATH,
            "format": fmt,
            "options": options,
            "limits": asdict(limits),
            "repair": repair,
        }
        # Starting (imports, lockdown) has its own allowance; the model's loading and checks get wall_seconds.
        started, _ = self.call(first, timeout_s=START_TIMEOUT_S)
        loaded, _ = self.reply(timeout_s=wall_seconds)
        self.hello = {**started, **loaded}

    def call(
        self,
        header: dict[str, Any],
        tensors: dict[str, torch.Tensor] | None = None,
        *,
        timeout_s: float | None = None,
        max_payload: int = 0,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        try:
            wire.send(self.requests, header, tensors)
        except (BrokenPipeError, OSError) as exc:
            raise self._died(exc) from None
        return self.reply(timeout_s=timeout_s, max_payload=max_payload)

    def reply(
        self, *, timeout_s: float | None = None, max_payload: int = 0
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        deadline = time.monotonic() + (timeout_s or self.wall_seconds)
        try:
            reply, out = wire.receive(self.replies, max_payload=max_payload, deadline=deadline, poll=self.interrupt)
        except TimeoutError:
            self.kill()
            raise JailError("timeout", f"The model ran longer than {timeout_s or self.wall_seconds:.0f} s.") from None
        except wire.PayloadTooLarge as exc:
            self.kill()
            log.warning("jailed child answered too much: %s", exc)
            raise JailError(
                "too_large", "The model answered with more data than its own parameters can need."
            ) from None
        except (EOFError, BrokenPipeError, OSError, wire.WireError, ValueError) as exc:
            raise self._died(exc) from None
        except BaseException:  # the interrupt: the job was cancelled or ran past its deadline
            self.kill()
            raise
        if not reply.get("ok"):
            self.close()
            raise _refusal(reply)
        return reply, out

    def _died(self, exc: BaseException) -> JailError:
        self.close()
        status = self.process.returncode
        # bwrap reports a child killed by a signal as 128 + the signal
        if status in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
            return JailError("cpu_limit", f"The model used more than its {self.limits.cpu_seconds} s of CPU time.")
        if isinstance(exc, wire.WireError):
            log.warning("jailed child sent a malformed message: %s", exc)
        return JailError("model_crashed", "The model crashed the process that ran it.")

    def _drain(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as stream:
            while chunk := stream.read(65536):
                if len(self.output) < OUTPUT_KEPT_BYTES:
                    self.output += chunk[: OUTPUT_KEPT_BYTES - len(self.output)]

    def kill(self) -> None:
        """End the child now (a cancelled job, a deadline): no polite close."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                wire.send(self.requests, {"op": "close"})
            except OSError:
                pass
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for fd in (self.requests, self.replies):
            try:
                os.close(fd)
            except OSError:
                pass
        self.drain.join(timeout=2)
        if self.output:  # one field of one JSON line: what the model printed cannot forge a line
            log.info("output of a foreign model", extra={"model_output": self.output.decode("utf-8", "replace")})
            self.output.clear()


def _refusal(reply: dict[str, Any]) -> JailError:
    code = reply.get("code") if isinstance(reply.get("code"), str) and _CODE.match(reply["code"]) else "model_failed"
    if reply.get("detail"):
        log.info("foreign model refused (%s): %s", code, printable(str(reply["detail"])))
    if code == "model_failed":
        # An exception's type name only, and only if it reads as one: a hijacked child could send any text.
        name = str(reply.get("exception", ""))
        return JailError(code, f"The model raised {name if _EXCEPTION.match(name) else 'an error'} while running.")
    if code == "memory_limit":
        return JailError(code, "The model needed more memory than a foreign model may use.")
    if code == "jail_unavailable":
        log.error("the jail could not lock down: %s", printable(str(reply.get("detail"))))
        return JailError(code, "Foreign models cannot be run safely on this server right now.")
    return JailError(str(code), printable(str(reply.get("message") or "The model was refused.")))


def printable(text: str) -> str:
    return _UNPRINTABLE.sub("?", text)[:_MESSAGE_CHARS]


def declared_bytes(path: str | Path, fmt: str) -> int:
    """What a model file declares its tensors to hold: a TorchScript archive's stored tensors (its `data/`
    entries, as its zip directory states them), an ONNX file's own size (its initializers are inside it)."""
    if fmt != "torchscript":
        return Path(path).stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(e.file_size for e in archive.infolist() if "/data/" in f"/{e.filename}")
    except (zipfile.BadZipFile, OSError):
        return Path(path).stat().st_size


def _head_description(said: Any) -> dict[str, Any] | None:
    """The child's `HeadSite.describe()`, kept to its fields: short printable strings and one flag."""
    if not isinstance(said, dict):
        return None
    described: dict[str, Any] = {"repairable": said.get("repairable") is True}
    for key in ("node", "features", "output_form", "weight", "bias", "not_repairable_because"):
        described[key] = printable(said[key]) if isinstance(said.get(key), str) else None
    return described


def check_model(path: str | Path, fmt: str, *, limits: Limits, wall_seconds: float, **options: Any) -> dict[str, Any]:
    """starvation.checkpoints.validate_checkpoint, run in a fresh jail; raises JailError."""
    child = _Child(path, fmt, "validate", options, limits, wall_seconds)
    try:
        info = child.hello.get("info")
        if not isinstance(info, dict):
            raise JailError("model_crashed", "The model crashed the process that ran it.")
        return {**info, "head": _head_description(info.get("head"))}
    finally:
        child.close()


class JailedModel(AuditableModel):
    """An uploaded model as the audit sees it; its forward passes run in a jailed child on the
    CPU. Close it (or use it as a context manager) to end the child."""

    def __init__(
        self,
        path: str | Path,
        fmt: str,
        *,
        limits: Limits,
        wall_seconds: float,
        repair: bool = False,
        interrupt: Callable[[], None] | None = None,
        **options: Any,
    ) -> None:
        self._child = _Child(path, fmt, "load", options, limits, wall_seconds, repair, interrupt)
        self.format = fmt
        hello = self._child.hello
        self.feature_layer = printable(hello["feature_layer"]) if isinstance(hello.get("feature_layer"), str) else None
        reason = hello.get("no_features_reason")
        self.no_features_reason = printable(reason) if isinstance(reason, str) else None
        self._head = _head_description(hello.get("head"))
        self.jail_layers = ["bubblewrap", *(str(layer) for layer in hello.get("jail", []))]

    def head_description(self) -> dict | None:
        return self._head

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> JailedModel:
        return self  # foreign models run on the CPU, in the jail

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward("logits", x)
        y = y.unsqueeze(1) if y is not None and y.dim() == 1 else y  # one logit per example, as [N]
        if y is None or y.dim() != 2 or y.shape[0] != x.shape[0]:
            raise JailError("bad_output_shape", "The model's logits do not have one row per example.")
        return y.to(x.device)

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.feature_layer is None:
            return None
        y = self._forward("features", x)
        if y is None or y.shape[0] != x.shape[0]:
            raise JailError("bad_output_shape", "The model's features do not have one row per example.")
        return y.flatten(1).to(x.device)

    def _forward(self, op: str, x: torch.Tensor) -> torch.Tensor | None:
        x = x.detach().to("cpu", torch.float32)
        # An answer may hold at most 64 KiB of floats per example, far above any logit or feature.
        _, out = self._child.call({"op": op}, {"x": x}, max_payload=len(x) * (1 << 16) + (1 << 20))
        y = out.get("y")
        if y is not None and not y.is_floating_point():
            raise JailError("bad_output_shape", "The model returned a tensor that is not floating point.")
        return None if y is None else y.float()

    def head(self) -> LinearHead:
        """The weight [k, d] and bias [k] of the model's last linear layer (its head)."""
        # A head is part of the model's parameters: the answer cannot need more than the file declares.
        _, out = self._child.call({"op": "head"}, max_payload=self._child.declared_bytes + ANSWER_SLACK_BYTES)
        weight, bias = out.get("weight"), out.get("bias")
        if not (
            isinstance(weight, torch.Tensor)
            and isinstance(bias, torch.Tensor)
            and weight.dim() == 2
            and weight.is_floating_point()
            and bias.is_floating_point()
            and bias.shape == (weight.shape[0],)
        ):
            raise JailError("no_linear_head", "The model's last layer did not read back as a linear layer.")
        return LinearHead(weight.float(), bias.float())

    def with_head(self, head: LinearHead, *, max_bytes: int) -> bytes:
        """The model's file (TorchScript or ONNX, as uploaded) with its head replaced, made in the child (the
        model there keeps the new head)."""
        tensors = {"weight": head.weight.float().contiguous(), "bias": head.bias.float().contiguous()}
        return self._model_bytes(
            self._child.call({"op": "replace_head"}, tensors, max_payload=max_bytes + (1 << 16)), max_bytes
        )

    def finetune(
        self, x: torch.Tensor, y: torch.Tensor, *, sd_lambda: float, lr: float, batch_size: int | None, seed: int
    ) -> None:
        """Start a TorchScript model's fine-tuning (`starvation.repair.finetune.Finetuning`) on (x, y), from the
        weights it was uploaded with; `finetune_steps` runs it."""
        self._child.call(
            {"op": "finetune", "sd_lambda": sd_lambda, "lr": lr, "batch_size": batch_size, "seed": seed},
            {"x": x.detach().to("cpu", torch.float32).contiguous(), "y": y.detach().cpu().contiguous()},
        )

    def finetune_steps(self, steps: int) -> float:
        """The fine-tuning's next `steps` updates; the last update's loss."""
        reply, _ = self._child.call({"op": "finetune_steps", "steps": steps})
        loss = reply.get("loss")
        return float(loss) if isinstance(loss, (int, float)) else float("nan")

    def model_bytes(self, *, max_bytes: int) -> bytes:
        """The (fine-tuned) TorchScript model as it is now in the child, serialised."""
        return self._model_bytes(self._child.call({"op": "model"}, max_payload=max_bytes + (1 << 16)), max_bytes)

    def _model_bytes(self, answer: tuple[dict[str, Any], dict[str, torch.Tensor]], max_bytes: int) -> bytes:
        """A model file the child sent. Untrusted: at most `max_bytes`, of this model's format by its bytes (it is
        only ever loaded again in a jail)."""
        from starvation.checkpoints.detect import identify

        model = answer[1].get("model")
        if not isinstance(model, torch.Tensor) or model.dtype != torch.uint8 or model.dim() != 1:
            raise JailError("model_crashed", "The jailed process did not return a model.")
        if model.numel() > max_bytes:
            raise JailError("too_large", f"The repaired model is larger than {max_bytes} bytes.")
        data = model.numpy().tobytes()
        if identify(data, max_unpacked_bytes=4 * max_bytes)[0] != self.format:
            raise JailError("model_crashed", f"The jailed process did not return a {self.format} model.")
        return data

    def close(self) -> None:
        self._child.close()

    def __enter__(self) -> JailedModel:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def open_model(
    path: str | Path,
    fmt: str,
    *,
    limits: Limits,
    wall_seconds: float,
    repair: bool = False,
    interrupt: Callable[[], None] | None = None,
    **options: Any,
) -> JailedModel:
    """A foreign model loaded in a jail (starvation.checkpoints.load_checkpoint's options);
    `repair=True` readies the child to read and replace the model's head."""
    return JailedModel(
        path, fmt, limits=limits, wall_seconds=wall_seconds, repair=repair, interrupt=interrupt, **options
    )
