"""An audit report as HTML: its sections (the numbers in tables, the plots as captioned <img>), alone or as one
self-contained page. Every number shows with three decimals, as the dashboard's do."""

from __future__ import annotations

from html import escape
from typing import Any

from starvation.audit.plots import plot_caption

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: left; }
th { background: #f3f3f3; }
.verdict-high { color: #b00020; } .verdict-partial { color: #a05a00; } .verdict-low { color: #1b7a1b; }
.verdict-uncertain { color: #5a4fa0; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
.note { color: #666; font-size: 0.9em; }
figure { margin: 1rem 0; } figcaption { color: #444; font-size: 0.9em; max-width: 48rem; }
.file { color: #666; font-family: monospace; font-size: 0.9em; }
"""
_SIDE_BY_SIDE = ".columns { display: flex; gap: 2rem; } .columns > section { flex: 1; min-width: 0; }"


def render_report_html(report: dict, plot_urls: dict[str, str], title: str) -> str:
    """A page for `report`; `plot_urls` maps each name in report["plots"] to where it is served."""
    return standalone_page(title, render_report_body(report, plot_urls))


def render_report_body(report: dict, plot_urls: dict[str, str]) -> str:
    """The report's sections, without a page around them (the dashboard puts them in its own)."""
    parts = [
        _summary(report),
        _groups(report),
        _counterfactual(report),
        _four_corners(report),
        _linear_probe(report),
        _ntk(report),
        _plots(report, plot_urls),
    ]
    return "\n".join(part for part in parts if part)


def standalone_page(title: str, body: str) -> str:
    """One page that needs nothing else: inline style, no script."""
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_text(title)}</title><style>{_STYLE}{_SIDE_BY_SIDE}</style></head><body>",
            f"<h1>{_text(title)}</h1>",
            body,
            "</body></html>",
        ]
    )


def _summary(report: dict) -> str:
    summary = report.get("summary") or {}
    verdict = summary.get("verdict")
    rows = [
        ("spurious attribute", report.get("spurious_attribute")),
        ("dataset", report.get("dataset")),
        ("reliance score", _estimate(summary.get("reliance_score"), summary.get("interval"))),
        ("verdict", _verdict(summary)),
        ("basis", summary.get("basis")),
    ]
    if summary.get("measure"):
        rows.append(("measure", summary["measure"]))
    if summary.get("direction"):
        rows.append(("direction", f"{summary['direction']} the attribute's training association"))
    if summary.get("reason"):
        rows.append(("why no score", summary["reason"]))
    css = f' class="verdict-{_text(verdict)}"' if verdict else ""
    return f"<h2{css}>Summary</h2>" + _table(["", ""], rows, header=False) + _seeds(report) + _confidence(report)


def _verdict(summary: dict) -> str | None:
    """The verdict, and the verdicts it lies between when it is `uncertain`."""
    verdict, possible = summary.get("verdict"), summary.get("possible_verdicts") or []
    return f"{verdict} (between {' and '.join(possible)})" if verdict == "uncertain" and possible else verdict


def _seeds(report: dict) -> str:
    pooled = report.get("pooled_summary")
    if not pooled or not pooled.get("per_seed"):
        return ""
    score = pooled.get("reliance_score") or {}
    rows = [
        (seed.get("seed"), _estimate(seed.get("reliance_score"), seed.get("interval")), _verdict(seed))
        for seed in pooled["per_seed"]
    ]
    rows.append(("pooled (mean)", _estimate(score.get("mean"), pooled.get("interval")), _verdict(pooled)))
    return '<h3>Seeds</h3><p class="note">The pooled interval admits the spread between seeds.</p>' + _table(
        ["seed", "reliance score", "verdict"], rows
    )


def _confidence(report: dict) -> str:
    confidence = report.get("confidence")
    if not confidence:
        return ""
    return (
        f'<p class="note">[low, high]: {_text(round(100 * confidence["level"]))}% confidence intervals; '
        f"{_text(confidence.get('shares'))} for shares of examples, {_text(confidence.get('scores'))} "
        f"for scores built from shares, {_text(confidence.get('means'))} for means.</p>"
    )


def _groups(report: dict) -> str:
    groups = report.get("groups")
    if not groups:
        return ""
    rows = [
        (
            g.get("label"),
            g.get("attribute"),
            "yes" if g.get("aligned") else "no",
            g.get("n"),
            _estimate(g.get("accuracy"), g.get("accuracy_interval")),
        )
        for g in groups
    ]
    totals = [
        (label, _estimate(report.get(key), report.get(f"{key}_interval")))
        for label, key in (
            ("average accuracy", "average_accuracy"),
            ("worst-group accuracy", "worst_group_accuracy"),
            ("bias-aligned accuracy", "bias_aligned_accuracy"),
            ("bias-conflicting accuracy", "bias_conflicting_accuracy"),
        )
    ]
    return (
        "<h2>Groups (test split)</h2>"
        + _table(["label", "attribute", "bias-aligned", "n", "accuracy"], rows)
        + _table(["", ""], totals, header=False)
    )


def _counterfactual(report: dict) -> str:
    counterfactual = report.get("counterfactual")
    if not counterfactual:
        return ""
    rows = [
        (label, _estimate(counterfactual.get(key), counterfactual.get(f"{key}_interval")))
        for label, key in (
            ("flip rate", "flip_rate"),
            ("flips towards the training association", "flip_rate_towards"),
            ("flips against it", "flip_rate_against"),
            ("net (towards - against)", "flip_rate_net"),
            ("mean |Δ logit|", "mean_abs_logit_change"),
            ("mean |Δ probability|", "mean_abs_probability_change"),
            ("accuracy", "accuracy"),
            ("accuracy, attribute changed", "accuracy_intervened"),
        )
        if key in counterfactual
    ]
    rows.append(("examples", counterfactual.get("n")))
    return (
        "<h2>Counterfactual</h2>"
        '<p class="note">Predictions with only the spurious attribute changed. A flip is towards the '
        "association when the new prediction is the label the new attribute value went with in training; "
        "a model that is only sensitive to the attribute flips both ways about equally.</p>"
        + _table(["", ""], rows, header=False)
    )


def _four_corners(report: dict) -> str:
    corners = report.get("four_corners")
    if not corners:
        return ""
    entropy = report.get("four_corners_entropy") or {}
    rows = [
        (name.replace("_", " "), _estimate(c.get("accuracy"), c.get("accuracy_interval")), c.get("entropy"), c.get("n"))
        for name, c in corners.items()
    ]
    note = f"Entropy of {entropy.get('of', 'the prediction')} in {entropy.get('unit', 'nats')}"
    if entropy.get("max") is not None:
        note += f" (at most {_number(entropy['max'])})"
    return f'<h2>Four corners</h2><p class="note">{_text(note)}.</p>' + _table(
        ["corner", "accuracy", "entropy", "n"], rows
    )


def _linear_probe(report: dict) -> str:
    probe = report.get("linear_probe")
    if not probe:
        return ""
    if probe.get("core_accuracy") is None:
        plain = [(key.replace("_", " "), value) for key, value in probe.items()]
        return "<h2>Linear probe</h2>" + _table(["", ""], plain, header=False)
    baseline = probe.get("random_network") or {}
    rows = [
        (
            label,
            _estimate(probe.get(key), probe.get(f"{key}_interval")),
            _estimate(baseline.get(key), baseline.get(f"{key}_interval"))
            if key in baseline
            else baseline.get("reason"),
        )
        for label, key in (
            ("core", "core_accuracy"),
            ("label (noise included)", "label_accuracy"),
            ("spurious attribute", "spurious_accuracy"),
        )
        if probe.get(key) is not None
    ]
    note = (
        f"Accuracy of logistic regressions reading layer {_text(probe.get('layer'))}; core label: "
        f"{_text(probe.get('core_label'))}; data: {_text(probe.get('data'))}, {_text(probe.get('n_fit'))} "
        "examples fit the core probe and "
        f"{_text(probe.get('n_score'))} score it. The random copy shows what the network's shape alone gives."
    )
    return f'<h2>Linear probe</h2><p class="note">{note}</p>' + _table(
        ["decodes", "this network", "randomly initialised copy"], rows
    )


def _ntk(report: dict) -> str:
    kernel = report.get("ntk")
    if not kernel:
        return ""
    if kernel.get("reason"):
        return "<h2>Neural tangent kernel</h2>" + _table(["", ""], [("not computed", kernel["reason"])], header=False)
    alignment = kernel.get("alignment") or {}
    rows = [
        (name, _number(value) if value is not None else "n/a")
        for name, value in (
            ("label", alignment.get("label")),
            ("spurious attribute", alignment.get("attribute")),
            ("core feature", alignment.get("core")),
        )
    ]
    shares = kernel.get("top_eigenvector_mass") or {}
    group_rows = [
        (group, _number(g["top_mass_share"]), _number(g["sample_share"]))
        for group, g in (shares.get("groups") or {}).items()
    ]
    sample = kernel.get("sample") or {}
    note = (
        f"The empirical NTK of the logit on {_text(sample.get('n'))} examples of the {_text(sample.get('split'))} "
        f"split, balanced over (label, attribute) groups (seed {_text(sample.get('seed'))}); the top 10 "
        f"eigenvalues hold {_number(kernel.get('trace_share_top10') or 0.0)} of its trace. Centred alignment: 1 "
        "when the kernel sees only that variable, near 0 when it ignores it."
    )
    return (
        f'<h2>Neural tangent kernel</h2><p class="note">{note}</p>'
        + _table(["aligned with", "alignment"], rows)
        + _table(
            [f"group (top {_text(shares.get('k'))} eigenvectors)", "share of their mass", "share of the sample"],
            group_rows,
        )
    )


def _plots(report: dict, plot_urls: dict[str, str]) -> str:
    images = [
        f'<figure><img src="{escape(plot_urls[name], quote=True)}" alt="{_text(plot_caption(name))}">'
        f'<figcaption>{_text(plot_caption(name))} <span class="file">{_text(name)}</span></figcaption></figure>'
        for name in report.get("plots") or []
        if name in plot_urls
    ]
    return "<h2>Plots</h2>" + "".join(images) if images else ""


def _table(headers: list[str], rows: list[tuple], *, header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{_text(h)}</th>" for h in headers) + "</tr>" if header else ""
    body = "".join(
        "<tr>"
        + "".join(
            f"<th>{_text(cell)}</th>" if not header and i == 0 else f"<td>{_text(cell)}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def _text(value) -> str:
    if isinstance(value, float):
        return _number(value)
    return escape("—" if value is None else str(value), quote=True)


def _number(value: float) -> str:
    return f"{value:.3f}"


def _estimate(value, interval) -> str | None:
    """`0.758 [0.729, 0.782]`: a number and its confidence interval (plain text; escaped when written)."""
    if value is None or not interval:
        return value
    return f"{_number(value)} [{_number(interval[0])}, {_number(interval[1])}]"


def render_repair_html(before: dict, after: dict, repair: dict, plot_urls: dict[str, str], title: str) -> str:
    """A repair job's page: the before/after numbers in one table, what fitted and what chose,
    then both audits side by side (groups, counterfactual, four corners, probe, plots)."""
    return standalone_page(title, render_repair_body(before, after, repair, plot_urls))


def render_repair_body(before: dict, after: dict, repair: dict, plot_urls: dict[str, str]) -> str:
    """`render_repair_html`'s sections, without a page around them."""

    def number(report: dict, *path: str) -> Any:
        value: Any = report
        for key in path:
            value = (value or {}).get(key)
        return value

    rows = [
        (label, number(before, *path), number(after, *path))
        for label, path in (
            ("reliance score", ("summary", "reliance_score")),
            ("verdict", ("summary", "verdict")),
            ("average accuracy (test)", ("average_accuracy",)),
            ("worst-group accuracy (test)", ("worst_group_accuracy",)),
            ("flip rate", ("counterfactual", "flip_rate")),
            ("linear probe: core", ("linear_probe", "core_accuracy")),
            ("linear probe: spurious", ("linear_probe", "spurious_accuracy")),
        )
    ]
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
        sections = [
            _summary(report),
            _groups(report),
            _counterfactual(report),
            _four_corners(report),
            _linear_probe(report),
            _ntk(report),
            _plots(report, plot_urls),
        ]
        return f"<section><h2>{_text(name)}</h2>" + "\n".join(s for s in sections if s) + "</section>"

    parts = [
        "<h2>Before and after</h2>" + _table(["", "before", "after"], rows),
        "<h2>Repair</h2>" + _table(["", ""], repair_rows, header=False),
        '<div class="columns">' + column("Before", before) + column("After", after) + "</div>",
    ]
    return "\n".join(parts)
