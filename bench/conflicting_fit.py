"""How well ERM and SD fit the bias-conflicting training examples against the rest, at the end of training.

    .venv/bin/python bench/conflicting_fit.py                 # seeds 0, 1, 2, the paper's recipes; ~15 min here

Explains the end of `bench/starvation_curves.py`: SD's share of the gradient carried by the bias-conflicting
examples (colour not the one most common for their label) ends below their share of the data. Per subset of the
pooled training split, for each method's final model: how many, accuracy on the (noisy) training label and on
the clean label (digit < 5), mean |logit|, mean |sigmoid(logit) - label| (what each example still teaches).
Mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from starvation.datasets import build  # noqa: E402
from starvation.checkpoints.save import load_builtin  # noqa: E402
from starvation.training import train  # noqa: E402
from bench.common import mean_std  # noqa: E402
from starvation.training.evaluation import bias_conflicting, logit_gradient, predictions  # noqa: E402

PRESETS = {"paper_cmnist_erm": "ERM", "paper_cmnist_sd": "SD"}
COLUMNS = ("n", "accuracy (training label)", "accuracy (clean label)", "mean abs(logit)",
           "mean abs(sigmoid - label)")


def subsets(preset: str, seed: int, work: pathlib.Path) -> dict[str, tuple[float, ...]]:
    """{subset: COLUMNS' values} for one seed's final model."""
    checkpoint = train({"preset": preset, "seeds": [seed], "eval_every": 500, "audit": False},
                       out_dir=work / f"{preset}-{seed}").checkpoints[0]
    model = load_builtin(checkpoint.safetensors_path, checkpoint.arch, checkpoint.arch_params,
                         checkpoint.input_shape, checkpoint.num_outputs).eval()
    data = build("colored_mnist", {}, seed=seed, data_dir=None)
    pooled, conflicting = data.train_data(), bias_conflicting(data)
    with torch.no_grad():
        logits = model(pooled.x).squeeze(-1)
    predicted, residual = predictions(logits), logit_gradient(logits, pooled.y)
    found = {}
    for name, rows in (("bias-conflicting", conflicting), ("bias-aligned", ~conflicting)):
        found[name] = (float(rows.sum()), float((predicted[rows] == pooled.y[rows]).float().mean()),
                       float((predicted[rows] == pooled.core_label[rows]).float().mean()),
                       float(logits[rows].abs().mean()), float(residual[rows].mean()))
    found["share of the summed abs(sigmoid - label)"] = (float(residual[conflicting].sum() / residual.sum()),)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma separated")
    seeds = [int(s) for s in parser.parse_args().seeds.split(",")]
    print(f"mean ± std over seeds {seeds}\n")
    print("| method | training examples | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    with tempfile.TemporaryDirectory() as work:
        for preset, label in PRESETS.items():
            runs = [subsets(preset, seed, pathlib.Path(work)) for seed in seeds]
            for name in runs[0]:
                cells = [mean_std(list(values)) for values in zip(*(run[name] for run in runs))]
                print(f"| {label} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
