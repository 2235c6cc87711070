"""What a refused upload raises, and how a model's own exceptions are reported without quoting them."""

from __future__ import annotations

from starvation.errors import CodedError

_MESSAGE_CHARS = 300


class CheckpointError(CodedError, ValueError):
    """An uploaded model we will not use, with a snake_case `code` and a message for a person.

    The message is ours: it never quotes what a model computed or raised. What a loader or the
    model said goes in `detail`, for the server's log only.
    """

    def __init__(self, code: str, message: str, *, detail: str | None = None) -> None:
        super().__init__(message, code=code)
        self.detail = detail


def printable(name: str) -> str:
    """An op name as a person may see it: short, and only plain characters."""
    clean = "".join(c if c.isascii() and (c.isalnum() or c in ":_.") else "?" for c in name)
    return clean[:60]


def out_of_memory(exc: BaseException) -> bool:
    """Whether torch (or Python) ran out of memory: under the jail's RLIMIT_AS, the model's doing."""
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def exception_name(exc: BaseException) -> str:
    """The type's name only: a model controls its exceptions' messages, not torch's class names."""
    return printable(type(exc).__name__)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:_MESSAGE_CHARS]
