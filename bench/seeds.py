"""N seeds trained as one batched model against the same seeds one after another.

    .venv/bin/python bench/seeds.py          # 10 seeds; ERM 100, SD 200, moons 1,000 steps (~5 min, 2 CPUs)
    .venv/bin/python bench/seeds.py --full   # the paper's protocol: ERM 1,001, SD 2,001, moons 10,000 steps
    .venv/bin/python bench/seeds.py --device cuda --full --tasks cmnist_erm,cmnist_sd
    .venv/bin/python bench/seeds.py --data-dir /data/mnist --n-train 40000 --device cuda --full --precision tf32
    .venv/bin/python bench/seeds.py --tiled --n-train 40000 --device cuda --full   # no MNIST at hand: tiled digits

Each (task, execution) runs `train` in a subprocess of its own, so that its peak memory is its own: the resident
set size (ru_maxrss) on the CPU, torch.cuda.max_memory_allocated on a GPU. Printed per run: wall time of the
whole `train` call (data, training, evaluation, checkpoints), loop time (the updates and evaluations: the
"training time" of the GPU target), the engine's step time (every seed one update), mean final test accuracy over
the seeds, peak memory. The two executions must agree on accuracy within 1 point.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = {  # preset, quick steps, the paper's steps
    "cmnist_erm": ("paper_cmnist_erm", 100, 1001),
    "cmnist_sd": ("paper_cmnist_sd", 200, 2001),
    "moons_sd": ("paper_moons_sd", 1000, 10_000),
}
AGREEMENT_POINTS = 1.0


def child(args: argparse.Namespace) -> int:
    """One run: print a JSON line with the wall time, step time, accuracies and peak memory."""
    import torch

    from bench.common import peak_memory_mib
    from starvation.training import train

    device = torch.device(args.device)
    spec = {"preset": args.preset, "seeds": list(range(args.n_seeds)), "steps": args.steps,
            "eval_every": max(1, args.steps // 10), "execution": args.execution, "precision": args.precision,
            "cuda_graphs": args.cuda_graphs, "audit": False}
    if args.n_train and args.preset.startswith("paper_cmnist"):
        spec["dataset"] = {"params": {"n_train": args.n_train}}
    baseline_mib = peak_memory_mib(device)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train(spec, out_dir=pathlib.Path(out), device=str(device), data_dir=args.data_dir).result
        wall_s = time.perf_counter() - started
    test = result["splits"]["test"] if "test" in result["splits"] else result["splits"][list(result["splits"])[-1]]
    print(json.dumps({"wall_s": wall_s, "loop_s": result["timing"]["train_s"] + result["timing"]["eval_s"], "step_ms": result["timing"]["step_ms"], "test": test["accuracy"]["mean"],
                      "used": result["execution"]["used"], "peak_mib": peak_memory_mib(device),
                      "baseline_mib": baseline_mib, "dataset": result["dataset"]}))
    return 0


def run_child(task: str, execution: str, steps: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", "--preset", TASKS[task][0], "--steps", str(steps),
               "--execution", execution, "--n-seeds", str(args.n_seeds), "--device", args.device,
               "--precision", args.precision] + (["--cuda-graphs"] if args.cuda_graphs else [])
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.n_train:
        command += ["--n-train", str(args.n_train)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{task} {execution} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-seeds", type=int, default=10)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--full", action="store_true", help="the paper's steps (default: the quick steps)")
    parser.add_argument("--steps", type=int, help="steps for every task (overrides quick/full)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", help="folder with full MNIST IDX files (default: the shipped 5,000 digits)")
    parser.add_argument("--executions", default="sequential,batched",
                        help="which to run (the accuracy check needs both)")
    parser.add_argument("--tiled", action="store_true",
                        help="full-MNIST-size data from the shipped digits repeated (bench.common.write_tiled_mnist)")
    parser.add_argument("--n-train", type=int, help="Colored MNIST: use the first N training digits (default: all)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--cuda-graphs", action="store_true", help="the spec's cuda_graphs (a CUDA device only)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--execution", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from bench.common import machine, write_tiled_mnist

    if args.tiled:
        if args.data_dir:
            parser.error("--tiled and --data-dir exclude each other")
        tiled = tempfile.TemporaryDirectory(prefix="tiled-mnist-")  # removed when the bench exits
        args.data_dir = str(write_tiled_mnist(pathlib.Path(tiled.name)))
        print("data: the shipped digits tiled to MNIST size (60,000 IDX images)")

    print(machine(torch.device(args.device)))
    print(f"{args.n_seeds} seeds per run, precision {args.precision}, cuda_graphs {args.cuda_graphs}; "
          "each run in its own process")
    print(f"{'task':10} {'steps':>6} {'execution':10} {'wall s':>8} {'loop s':>8} {'step ms':>8} {'test %':>7} "
          f"{'peak MiB':>9}")
    failures, batched_loop_s = 0, {}
    for task in args.tasks.split(","):
        steps = args.steps or TASKS[task][2 if args.full else 1]
        runs = {}
        for execution in args.executions.split(","):
            runs[execution] = run = run_child(task, execution, steps, args)
            print(f"{task:10} {steps:6d} {execution:10} {run['wall_s']:8.1f} {run['loop_s']:8.2f} {run['step_ms']:8.2f} "
                  f"{100 * run['test']:7.2f} {run['peak_mib']:9.0f}", flush=True)
        if "batched" in runs:
            batched_loop_s[task] = (steps, runs["batched"]["loop_s"])
        if set(runs) != {"sequential", "batched"}:
            continue
        gap = 100 * abs(runs["batched"]["test"] - runs["sequential"]["test"])
        agree = gap <= AGREEMENT_POINTS
        failures += not agree
        sequential, batched = runs["sequential"], runs["batched"]
        print(f"{task:10} sequential/batched wall time {sequential['wall_s'] / batched['wall_s']:.2f}x, "
              f"step time {sequential['step_ms'] / batched['step_ms']:.2f}x; "
              f"test accuracy gap {gap:.2f} points ({'agree' if agree else 'DISAGREE'}); "
              f"data: {runs['batched']['dataset'].get('source', 'built-in')}", flush=True)
    if {"cmnist_erm", "cmnist_sd"} <= set(batched_loop_s):
        (erm_steps, erm_s), (sd_steps, sd_s) = batched_loop_s["cmnist_erm"], batched_loop_s["cmnist_sd"]
        print(f"the protocol, batched (ERM {erm_steps} + SD {sd_steps} steps, {args.n_seeds} seeds): training time "
              f"{erm_s + sd_s:.2f} s (loop s: the updates and "
              f"evaluations; wall s adds data, set-up and checkpoints)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
