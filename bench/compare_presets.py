"""Train a few Colored MNIST presets on the same seeds and print their final train and test accuracy.

    python bench/compare_presets.py --presets paper_cmnist_irm,paper_cmnist_sd --seeds 0

For a quick comparison of methods (e.g. a new one against SD) without rewriting docs/reproduction.md, which
`bench/reproduce.py` owns. Each preset runs through `starvation.training.train`, as a job would.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reproduce import colored_mnist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="paper_cmnist_irm,paper_cmnist_sd", help="comma separated")
    parser.add_argument("--seeds", default="0", help="comma separated")
    parser.add_argument("--dataset-params", default="{}", help="JSON merged into each preset's dataset params")
    parser.add_argument("--data-dir", default=None, help="a folder with MNIST IDX files (default: shipped digits)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = json.loads(args.dataset_params)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for preset in args.presets.split(","):
            run = colored_mnist(preset, seeds, args.data_dir, pathlib.Path(work), dataset_params=extra)
            splits = run["result"]["splits"]
            rows[preset] = {"train_accuracy": splits["train"]["accuracy"], "test_accuracy": splits["test"]["accuracy"],
                            "test_per_seed": run["test_per_seed"], "wall_s": run["wall_s"],
                            "dataset": run["result"]["dataset"]}
            print(f"{preset}: train {100 * splits['train']['accuracy']['mean']:.2f} % "
                  f"test {100 * splits['test']['accuracy']['mean']:.2f} % "
                  f"(per seed {', '.join(f'{100 * t:.2f}' for t in run['test_per_seed'])}; "
                  f"{run['wall_s']:.0f} s, seeds {seeds})", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"seeds": seeds, "presets": rows}, indent=2, default=float))


if __name__ == "__main__":
    main()
