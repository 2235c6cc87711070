"""Audit any trained classifier for reliance on a spurious feature (API.md, "Audit spec" and "Report").

`run_audit` runs the probes in `PROBES` (groups, counterfactual, four_corners, linear_probe)
on an `AuditableModel` (see `starvation.checkpoints`) and returns the report;
`render_report_html` turns a report into a page.
"""
from starvation.audit.html import render_repair_html, render_report_html
from starvation.audit.probes import PROBES, AuditContext, Probe
from starvation.audit.report import pool_reliance, resolve_probes, run_audit, supported_probes, verdict, verdicts

__all__ = ["PROBES", "AuditContext", "Probe", "pool_reliance", "render_repair_html", "render_report_html",
           "resolve_probes", "run_audit", "supported_probes", "verdict", "verdicts"]
