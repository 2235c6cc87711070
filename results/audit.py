"""What a finished audit job returns."""

from __future__ import annotations

from results.report import Report


class AuditResult(Report):
    """A finished audit job: its report (also at /report) and where the model ran."""

    device: str
