"""An audit report as one self-contained HTML page: the numbers in tables, the plots as <img>."""
from __future__ import annotations

from html import escape

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: left; }
th { background: #f3f3f3; }
.verdict-high { color: #b00020; } .verdict-partial { color: #a05a00; } .verdict-low { color: #1b7a1b; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
.note { color: #666; font-size: 0.9em; }
"""


def render_report_html(report: dict, plot_urls: dict[str, str], title: str) -> str:
    """A page for `report`; `plot_urls` maps each name in report["plots"] to where it is served."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_text(title)}</h1>",
        _summary(report),
        _groups(report),
        _counterfactual(report),
        _four_corners(report),
        _linear_probe(report),
        _plots(report, plot_urls),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


def _summary(report: dict) -> str:
    summary = report.get("summary") or {}
    verdict = summary.get("verdict")
    rows = [
        ("spurious attribute", report.get("spurious_attribute")),
        ("dataset", report.get("dataset")),
        ("reliance score", summary.get("reliance_score")),
        ("verdict", verdict),
        ("basis", summary.get("basis")),
    ]
    if summary.get("reason"):
        rows.append(("why no score", summary["reason"]))
    css = f' class="verdict-{_text(verdict)}"' if verdict else ""
    return f"<h2{css}>Summary</h2>" + _table(["", ""], rows, header=False)


def _groups(report: dict) -> str:
    groups = report.get("groups")
    if not groups:
        return ""
    rows = [(g.get("label"), g.get("attribute"), "yes" if g.get("aligned") else "no", g.get("n"), g.get("accuracy"))
            for g in groups]
    totals = [
        ("average accuracy", report.get("average_accuracy")),
        ("worst-group accuracy", report.get("worst_group_accuracy")),
        ("bias-aligned accuracy", report.get("bias_aligned_accuracy")),
        ("bias-conflicting accuracy", report.get("bias_conflicting_accuracy")),
    ]
    return ("<h2>Groups (test split)</h2>"
            + _table(["label", "attribute", "bias-aligned", "n", "accuracy"], rows)
            + _table(["", ""], totals, header=False))


def _counterfactual(report: dict) -> str:
    counterfactual = report.get("counterfactual")
    if not counterfactual:
        return ""
    rows = [(key.replace("_", " "), value) for key, value in counterfactual.items()]
    return ("<h2>Counterfactual</h2>"
            '<p class="note">Predictions with only the spurious attribute changed.</p>'
            + _table(["", ""], rows, header=False))


def _four_corners(report: dict) -> str:
    corners = report.get("four_corners")
    if not corners:
        return ""
    entropy = report.get("four_corners_entropy") or {}
    rows = [(name.replace("_", " "), c.get("accuracy"), c.get("entropy"), c.get("n")) for name, c in corners.items()]
    note = f"Entropy of {entropy.get('of', 'the prediction')} in {entropy.get('unit', 'nats')}"
    if entropy.get("max") is not None:
        note += f" (at most {_number(entropy['max'])})"
    return (f'<h2>Four corners</h2><p class="note">{_text(note)}.</p>'
            + _table(["corner", "accuracy", "entropy", "n"], rows))


def _linear_probe(report: dict) -> str:
    probe = report.get("linear_probe")
    if not probe:
        return ""
    rows = [(key.replace("_", " "), value) for key, value in probe.items()]
    return "<h2>Linear probe</h2>" + _table(["", ""], rows, header=False)


def _plots(report: dict, plot_urls: dict[str, str]) -> str:
    images = [
        f'<figure><img src="{escape(plot_urls[name], quote=True)}" alt="{escape(name, quote=True)}">'
        f"<figcaption>{_text(name)}</figcaption></figure>"
        for name in report.get("plots") or [] if name in plot_urls
    ]
    return "<h2>Plots</h2>" + "".join(images) if images else ""


def _table(headers: list[str], rows: list[tuple], *, header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{_text(h)}</th>" for h in headers) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(
            f"<th>{_text(cell)}</th>" if not header and i == 0 else f"<td>{_text(cell)}</td>"
            for i, cell in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def _text(value) -> str:
    if isinstance(value, float):
        return _number(value)
    return escape("—" if value is None else str(value), quote=True)


def _number(value: float) -> str:
    return f"{value:.4g}"


_SIDE_BY_SIDE = ".columns { display: flex; gap: 2rem; } .columns > section { flex: 1; min-width: 0; }"


def render_repair_html(before: dict, after: dict, repair: dict, plot_urls: dict[str, str], title: str) -> str:
    """A repair job's page: the before/after numbers in one table, what fitted and what chose,
    then both audits side by side (groups, counterfactual, four corners, probe, plots)."""
    def number(report: dict, *path: str):
        value = report
        for key in path:
            value = (value or {}).get(key)
        return value

    rows = [(label, number(before, *path), number(after, *path)) for label, path in (
        ("reliance score", ("summary", "reliance_score")),
        ("verdict", ("summary", "verdict")),
        ("average accuracy (test)", ("average_accuracy",)),
        ("worst-group accuracy (test)", ("worst_group_accuracy",)),
        ("flip rate", ("counterfactual", "flip_rate")),
        ("linear probe: core", ("linear_probe", "core_accuracy")),
        ("linear probe: spurious", ("linear_probe", "spurious_accuracy")),
    )]
    selection = repair.get("selection") or {}
    method = repair.get("method") or {}
    fitted, chosen_on = selection.get("fitted_on") or {}, selection.get("chosen_on") or {}
    repair_rows = [
        ("method", method.get("name")),
        ("new checkpoint", repair.get("checkpoint_id")),
        ("parent checkpoint", repair.get("parent_checkpoint_id")),
        ("head changed", "yes" if repair.get("changed") else "no"),
        ("chosen", ", ".join(f"{k}={v}" for k, v in (selection.get("chosen") or {}).items())),
        ("fitted on", f"{fitted.get('data')} ({fitted.get('n')} examples)"),
        ("chosen on", f"{chosen_on.get('data')} ({chosen_on.get('n')} examples, by {chosen_on.get('criterion')})"),
        ("test split used to fit or choose", "no" if selection.get("test_split_used") is False else "?"),
    ]
    for key in ("note",):
        if repair.get(key):
            repair_rows.append((key, repair[key]))
    if selection.get("reason"):
        repair_rows.append(("why unchanged", selection["reason"]))

    def column(name: str, report: dict) -> str:
        sections = [_summary(report), _groups(report), _counterfactual(report), _four_corners(report),
                    _linear_probe(report), _plots(report, plot_urls)]
        return f"<section><h2>{_text(name)}</h2>" + "\n".join(s for s in sections if s) + "</section>"

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(title)}</title><style>{_STYLE}{_SIDE_BY_SIDE}</style></head><body>",
        f"<h1>{_text(title)}</h1>",
        "<h2>Before and after</h2>" + _table(["", "before", "after"], rows),
        "<h2>Repair</h2>" + _table(["", ""], repair_rows, header=False),
        '<div class="columns">' + column("Before", before) + column("After", after) + "</div>",
        "</body></html>",
    ]
    return "\n".join(parts)
