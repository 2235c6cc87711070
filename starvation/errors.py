"""The errors the science package raises for a person to read, each with the code a failed job or a 4xx carries.

One hierarchy from here to the API: a class says its `code`; the worker records `code` and `message` of whatever
`CodedError` a job raised (worker/runner.py), and the API turns one into a 422 (api/errors.py `coded_error`).
"""

from __future__ import annotations


class CodedError(Exception):
    """An error whose message is ours, written for a person, with a snake_case `code`."""

    code: str = "invalid_spec"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class SpecError(CodedError, ValueError):
    """A spec, parameter or user file is invalid; the message is written for a person."""

    code = "invalid_spec"
