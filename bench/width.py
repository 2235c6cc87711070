"""The width question (issue 34): does SD's benefit shrink as the network widens, and does its memorisation grow?

    python bench/width.py --dataset colored_mnist --widths 100,300 --seeds 0,1,2
    python bench/width.py --dataset two_moons --widths 100,300,1000 --seeds 0,1,2

ERM, weight decay and SD at the paper's recipes (`paper_cmnist_*`, `paper_moons_*`; two moons has no weight-decay
preset: 1e-3, our choice) with the hidden layers set to each width (Colored MNIST: both of the MLP's two hidden
layers; two moons: its one). Per run, at the end of training: test accuracy; accuracy on the training label of the
bias-conflicting training examples (colour not the one most common for their label: what memorising looks like
here; Colored MNIST only); the mean |logit| on the training data; the NTK's centred alignment with label, attribute
and core feature on 256 training examples (`ntk_every` = the run's length). Mean ± std (population) over seeds,
with a 95 % t-interval of the test accuracy. One run per (method, width, seed), one at a time.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch
from scipy import stats

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, mean_std  # noqa: E402
from starvation.checkpoints import load_builtin  # noqa: E402
from starvation.datasets import build  # noqa: E402
from starvation.presets import PRESETS  # noqa: E402
from starvation.training import train  # noqa: E402
from starvation.training.evaluation import bias_conflicting, predictions  # noqa: E402

METHODS = {
    "colored_mnist": {"ERM": ("paper_cmnist_erm", None), "weight decay": ("paper_cmnist_weight_decay", None),
                      "SD": ("paper_cmnist_sd", None)},
    "two_moons": {"ERM": ("paper_moons_erm", None),
                  "weight decay": ("paper_moons_erm", {"name": "weight_decay", "weight_decay": 1e-3}),
                  "SD": ("paper_moons_sd", None)},
}
COLUMNS = ("test accuracy", "conflicting fit", "mean |logit|", "NTK align. label", "NTK align. attribute",
           "NTK align. core")


def run(dataset: str, preset: str, method: dict | None, width: int, seed: int, work: pathlib.Path) -> dict:
    base = PRESETS[preset]
    layers = len(base["model"]["hidden"])
    steps = base["steps"]
    spec = {"preset": preset, "seeds": [seed], "audit": False, "eval_every": steps, "ntk_every": steps,
            "model": {**base["model"], "hidden": [width] * layers}}
    if method is not None:
        spec["method"] = method
    rows: list = []
    outcome = train(spec, out_dir=work / f"{preset}-{width}-{seed}", on_metrics=rows.extend)
    final = {(m.split, m.name): m.value for m in rows if m.step == steps}
    checkpoint = outcome.checkpoints[0]
    model = load_builtin(checkpoint.safetensors_path, checkpoint.arch, checkpoint.arch_params,
                         checkpoint.input_shape, checkpoint.num_outputs).eval()
    data = build(dataset, PRESETS[preset]["dataset"].get("params") or {}, seed=seed, data_dir=None)
    pooled = data.train_data()
    with torch.no_grad():
        logits = model(pooled.x).squeeze(-1)
    conflicting = bias_conflicting(data)
    fit = (float((predictions(logits)[conflicting] == pooled.y[conflicting]).float().mean())
           if conflicting is not None else None)
    return {"test accuracy": final[("test", "accuracy")], "conflicting fit": fit,
            "mean |logit|": float(logits.abs().mean()),
            **{f"NTK align. {name}": final.get(("train", f"ntk_alignment_{name}"))
               for name in ("label", "attribute", "core")}}


def cell(values: list[float | None], column: str) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    scale = 100.0 if column in ("test accuracy", "conflicting fit") else 1.0
    text = mean_std(present, digits=2 if scale == 100.0 else 3, scale=scale)
    if column == "test accuracy" and len(present) > 1:
        half = stats.t.ppf(0.975, len(present) - 1) * np.std(present, ddof=1) / np.sqrt(len(present)) * scale
        text += f" ({np.mean(present) * scale - half:.1f}-{np.mean(present) * scale + half:.1f})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(METHODS), default="colored_mnist")
    parser.add_argument("--widths", default="100,300")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS["colored_mnist"]))
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    print(machine(torch.device("cpu")))
    print(f"{args.dataset}, seeds {seeds}; mean ± std over seeds (test accuracy with its 95 % t-interval), %")
    print("\n| method | width | " + " | ".join(COLUMNS) + " | s per run |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    with tempfile.TemporaryDirectory() as folder:
        for name in methods:
            preset, method = METHODS[args.dataset][name]
            for width in widths:
                started, found = time.perf_counter(), []
                for seed in seeds:
                    found.append(run(args.dataset, preset, method, width, seed, pathlib.Path(folder)))
                took = (time.perf_counter() - started) / len(seeds)
                cells = [cell([f[column] for f in found], column) for column in COLUMNS]
                print(f"| {name} | {width} | " + " | ".join(cells) + f" | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
