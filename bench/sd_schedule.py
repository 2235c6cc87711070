"""How much SD's result on the shipped digits rests on its schedule (issue: audit science).

    .venv/bin/python bench/sd_schedule.py                 # 3 seeds, the paper's 2,001 steps; ~15 min here
    .venv/bin/python bench/sd_schedule.py --seeds 1 --steps 600 --every 100   # a quick look

`paper_cmnist_sd` switches at step 450 from a warm-up (lambda 4e-5) to lambda 2 with the whole loss scaled by
2e-5, keeping Adam's state. Three variants, each over the same seeds, data and initial networks:
- `published`: that recipe;
- `no_scale`: the same without the 2e-5 scale (post_warmup_loss_scale 1) — both as one sweep job would train
  them (`starvation.training.sweep`, selection oracle: nothing held out);
- `fresh_adam`: the recipe, but with a new Adam at the switch (its moments and step count reset): a loop of its
  own here, as no job offers it;
and ERM (`paper_cmnist_erm`) for reference. Printed: the test accuracy at the end and at its best step (mean
± std over seeds), and `docs/img/sd_schedule.png`, the test accuracy over steps per variant.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SWITCH = 450  # paper_cmnist_sd's warmup_steps: where the schedule changes


def curves_from_sweep(seeds: list[int], steps: int, every: int) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """{"published" | "no_scale": {seed: [(step, test accuracy)]}}, trained as one sweep."""
    from starvation.training.sweep import sweep

    curves: dict[str, dict[int, list]] = {"published": {}, "no_scale": {}}
    names = {"s0/test": "published", "s1/test": "no_scale"}

    def collect(rows) -> None:
        for row in rows:
            if row.name == "accuracy" and row.split in names:
                curves[names[row.split]].setdefault(row.seed, []).append((row.step, row.value))

    sweep({"preset": "paper_cmnist_sd", "steps": steps, "eval_every": every, "seeds": seeds, "audit": False,
           "selection": "oracle", "grid": {"method.post_warmup_loss_scale": [2e-5, 1.0]}},
          out_dir=pathlib.Path(tempfile.mkdtemp(prefix="bench-sd-schedule-")), on_metrics=collect)
    return curves


def curves_from_train(preset: str, seeds: list[int], steps: int, every: int) -> dict[int, list[tuple[int, float]]]:
    from starvation.training import train

    curves: dict[int, list] = {}

    def collect(rows) -> None:
        for row in rows:
            if row.name == "accuracy" and row.split == "test":
                curves.setdefault(row.seed, []).append((row.step, row.value))

    train({"preset": preset, "steps": steps, "eval_every": every, "seeds": seeds, "audit": False},
          out_dir=pathlib.Path(tempfile.mkdtemp(prefix="bench-sd-schedule-")), on_metrics=collect)
    return curves


def fresh_adam_curve(seed: int, steps: int, every: int) -> list[tuple[int, float]]:
    """paper_cmnist_sd with a new Adam at the switch; otherwise `train_seed`'s init, data and updates."""
    from starvation import datasets
    from starvation.methods import build_method
    from starvation.training import build_optimizer, evaluate, evaluation_splits, resolve_train_spec, train_step
    from starvation.training.execution import init_network

    spec = resolve_train_spec({"preset": "paper_cmnist_sd", "seeds": [seed], "steps": steps})
    data = datasets.build("colored_mnist", spec["dataset"]["params"], seed=seed, data_dir=None)
    splits = evaluation_splits(data)
    model = init_network(spec, data, seed)
    method = build_method(spec["method"])
    optimizer = build_optimizer(spec["optimizer"], model.parameters())
    switch, train_split, curve = spec["method"]["warmup_steps"], splits["train"], []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            curve.append((step, evaluate(model, {"test": splits["test"]})[("test", "accuracy")]))
        if step == steps:
            break
        if step == switch:
            optimizer = build_optimizer(spec["optimizer"], model.parameters())
        train_step(model, optimizer, method, train_split.x, train_split.y, step)
    return curve


def summary(curves: dict[int, list[tuple[int, float]]], after: int) -> tuple[str, str]:
    """(the last step's test accuracy, the best from step `after` on), mean ± std over seeds, in %."""
    finals = [curve[-1][1] for curve in curves.values()]
    bests = [max(value for step, value in curve if step >= after) for curve in curves.values()]

    def text(values: list[float]) -> str:
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"

    return text(finals), text(bests)


def plot(variants: dict[str, dict[int, list[tuple[int, float]]]], switch: int, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    for name, curves in variants.items():
        steps = [step for step, _ in next(iter(curves.values()))]
        mean = [statistics.mean(curve[i][1] for curve in curves.values()) for i in range(len(steps))]
        axes.plot(steps, [100 * m for m in mean], label=name)
    axes.axvline(switch, color="grey", linestyle=":", linewidth=1)
    axes.text(switch, 5, f" SD switch (step {switch})", color="grey", fontsize=8)
    axes.set(xlabel="step", ylabel="test accuracy, % (mean over seeds)", ylim=(0, 100),
             title="Colored MNIST, shipped digits: SD's schedule")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2001)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--plot", type=pathlib.Path, default=ROOT / "docs" / "img" / "sd_schedule.png")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    variants = curves_from_sweep(seeds, args.steps, args.every)
    variants["fresh_adam"] = {seed: fresh_adam_curve(seed, args.steps, args.every) for seed in seeds}
    variants["erm"] = curves_from_train("paper_cmnist_erm", seeds, min(args.steps, 1001), args.every)
    print(f"| variant ({len(seeds)} seeds, {args.steps} steps) | test % at the end | best test % from step 450 |")
    print("|---|---|---|")
    for name, curves in variants.items():
        final, best = summary(curves, after=SWITCH)
        print(f"| {name} | {final} | {best} |")
    plot(variants, SWITCH, args.plot)
    print(f"plot: {args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot}")


if __name__ == "__main__":
    main()
