"""The paper's central claim, measured: as the spurious colour gets stronger in training, ERM leans on it more
and learns less of the digit; SD should keep learning the digit.

    .venv/bin/python bench/feature_strength.py                      # 6 strengths x ERM/SD x 2 seeds, ~15 min here
    .venv/bin/python bench/feature_strength.py --strengths 0.5,0.9 --seeds 1 --erm-steps 300 --sd-steps 600

For each colour-label agreement c in training (both training environments: `color_flip_train` 1 - c; the test
split keeps the paper's 0.9 flip), `paper_cmnist_erm` and `paper_cmnist_sd` train on the shipped digits. Each
network is then shown the "core only" corner of the test split (the digit in grey, no colour: PAPER.md's four
corners) and scored against the clean digit label (digit < 5, before label noise): its accuracy there, and its
mean signed margin (the logit times +1 for a clean label 1, -1 for 0: how far the digit alone pushes the right
way). Printed as a table (mean ± std over seeds) plus the ordinary test accuracy.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import mean_std  # noqa: E402


def scores(checkpoint, seed: int, params: dict) -> tuple[float, float, float]:
    """(test accuracy, core-only accuracy against the clean label, core-only mean signed margin) of a network,
    on the test split of the data its seed trained on."""
    import torch

    from starvation import datasets
    from starvation.checkpoints import load_checkpoint

    model = load_checkpoint(checkpoint.safetensors_path, "safetensors")
    data = datasets.build("colored_mnist", params, seed=seed, data_dir=None)
    test = data.splits[data.test_split]
    corner = data.four_corners(test)["core_only"]
    with torch.no_grad():
        logits, test_logits = model.logits(corner.x).squeeze(1), model.logits(test.x).squeeze(1)
    sign = 2.0 * corner.core_label.float() - 1.0
    return (float(((test_logits > 0).long() == test.y).float().mean()),
            float(((logits > 0).long() == corner.core_label).float().mean()), float((sign * logits).mean()))


def run(preset: str, strength: float, seeds: list[int], steps: int) -> dict[str, list[float]]:
    from starvation.training import train

    params = {"color_flip_train": [round(1 - strength, 6)] * 2}
    outcome = train({"preset": preset, "steps": steps, "eval_every": steps, "seeds": seeds, "audit": False,
                     "dataset": {"name": "colored_mnist", "params": params}},
                    out_dir=pathlib.Path(tempfile.mkdtemp(prefix="bench-strength-")))
    per_seed = [scores(checkpoint, checkpoint.seed, params) for checkpoint in outcome.checkpoints]
    return {"test": [s[0] for s in per_seed], "core_accuracy": [s[1] for s in per_seed],
            "core_margin": [s[2] for s in per_seed]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strengths", default="0.5,0.6,0.7,0.8,0.9,0.95")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--erm-steps", type=int, default=1001)
    parser.add_argument("--sd-steps", type=int, default=2001)
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    print(f"mean ± std over {len(seeds)} seeds; ERM {args.erm_steps} steps, SD {args.sd_steps} steps\n")
    print("| colour agrees with the label in training | method | test % | core-only accuracy % (clean label) "
          "| core-only mean signed margin |")
    print("|---|---|---|---|---|")
    for strength in (float(s) for s in args.strengths.split(",")):
        for method, preset, steps in (("ERM", "paper_cmnist_erm", args.erm_steps),
                                      ("SD", "paper_cmnist_sd", args.sd_steps)):
            row = run(preset, strength, seeds, steps)
            print(f"| {strength:.2f} | {method} | {mean_std(row['test'], 1, 100)} | {mean_std(row['core_accuracy'], 1, 100)} "
                  f"| {mean_std(row['core_margin'], 2)} |", flush=True)


if __name__ == "__main__":
    main()
