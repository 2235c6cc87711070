"""The one error the science package raises for a bad spec, path or upload."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec, parameter or user file is invalid; the message is written for a person."""
