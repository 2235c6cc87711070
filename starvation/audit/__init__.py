"""Audit any trained classifier for reliance on a spurious feature (API.md, "Audit spec" and "Report").

`run_audit` runs the probes in `PROBES` (groups, counterfactual, four_corners, linear_probe)
on an `AuditableModel` (see `starvation.checkpoints`) and returns the report;
`render_report_html` turns a report into a page (`render_report_body`: its sections alone).
"""

from starvation.audit.html import (
    render_repair_body,
    render_repair_html,
    render_report_body,
    render_report_html,
    standalone_page,
)
from starvation.audit.plots import ALIGNED_COLOUR, CONFLICTING_COLOUR, plot_caption
from starvation.audit.probes import PROBES, AuditContext, Probe
from starvation.audit.report import pool_reliance, resolve_probes, run_audit, supported_probes, verdict, verdicts

__all__ = [
    "ALIGNED_COLOUR",
    "CONFLICTING_COLOUR",
    "PROBES",
    "AuditContext",
    "Probe",
    "plot_caption",
    "pool_reliance",
    "render_repair_body",
    "render_repair_html",
    "render_report_body",
    "render_report_html",
    "resolve_probes",
    "run_audit",
    "standalone_page",
    "supported_probes",
    "verdict",
    "verdicts",
]
