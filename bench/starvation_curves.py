"""Gradient starvation between features, followed over training: ERM against SD on Colored MNIST (issue: audit science).

    .venv/bin/python bench/starvation_curves.py                 # 3 seeds, the paper's step counts; ~10 min here
    .venv/bin/python bench/starvation_curves.py --seeds 0 --steps 300 --every 100   # a quick look

Two metrics every train job streams at each evaluation (`starvation/training/evaluation.py`):
- `train/conflicting_gradient_share`: the share of the cross-entropy's logit gradient, summed over the pooled
  training split, that the bias-conflicting examples carry (colour not the one most common for their label;
  ~15 % of the examples). Once colour fits the rest, they stop teaching: the share rises towards 1.
- `core_only/margin`: the mean logit in favour of the clean label (digit < 5) on the test digits in grey, colour
  removed: what the digit alone has earned.
Printed: a markdown table (mean ± std over seeds at chosen steps) and `docs/img/starvation_curves.png`.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import mean_std  # noqa: E402

METRICS = {("train", "conflicting_gradient_share"): "share of the gradient from bias-conflicting examples",
           ("core_only", "margin"): "core-only margin (grey test digits, clean label)",
           ("test", "accuracy"): "test accuracy"}
PRESETS = {"paper_cmnist_erm": "ERM", "paper_cmnist_sd": "SD"}


def curves(preset: str, seeds: list[int], steps: int | None, every: int | None,
           work: pathlib.Path) -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """{metric: {step: {seed: value}}} of one preset trained as a job would train it."""
    from starvation.training import train

    found: dict[tuple[str, str], dict[int, dict[int, float]]] = {metric: {} for metric in METRICS}

    def collect(rows) -> None:
        for row in rows:
            if (row.split, row.name) in found:
                found[row.split, row.name].setdefault(row.step, {})[row.seed] = row.value

    spec = {"preset": preset, "seeds": seeds, "audit": False} | ({"steps": steps} if steps else {}) | (
        {"eval_every": every} if every else {})
    train(spec, out_dir=work / preset, on_metrics=collect)
    return found


def plot(runs: dict[str, dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
    for axis, (metric, title) in zip(axes, METRICS.items()):
        for (preset, found), colour in zip(runs.items(), ("tab:red", "tab:blue")):
            by_step = found[metric]
            for seed in sorted({seed for values in by_step.values() for seed in values}):
                points = sorted((step, values[seed]) for step, values in by_step.items() if seed in values)
                axis.plot(*zip(*points), color=colour, alpha=0.8, label=PRESETS[preset] if seed == min(
                    s for v in by_step.values() for s in v) else None)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="default: each preset's own (1,001 / 2,001)")
    parser.add_argument("--every", type=int, default=None, help="evaluation interval; default: each preset's own")
    parser.add_argument("--table-every", type=int, default=200, help="steps between the table's rows")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "starvation_curves.png"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as work:
        runs = {preset: curves(preset, seeds, args.steps, args.every, pathlib.Path(work)) for preset in PRESETS}
    plot(runs, pathlib.Path(args.plot))
    header = [f"{PRESETS[p]} {name}" for p in runs for name in ("conflicting share", "core-only margin", "test acc.")]
    print("| step | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    steps = sorted({step for found in runs.values() for step in found["train", "conflicting_gradient_share"]})
    for step in steps:
        if step % args.table_every and step != steps[-1] and step not in (
                max(found["train", "conflicting_gradient_share"]) for found in runs.values()):
            continue
        cells = []
        for found in runs.values():
            for metric in METRICS:
                values = list(found[metric].get(step, {}).values())
                cells.append(mean_std(values, 2 if metric[1] == "margin" else 3) if values else "")
        print(f"| {step} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nplot: {args.plot}; seeds {seeds}")


if __name__ == "__main__":
    main()
