"""A sweep of 8 SD settings x 2 seeds as one job, against the same 16 models trained as separate train jobs.

    .venv/bin/python bench/sweep.py                  # paper_cmnist_sd, its 2,001 steps
    .venv/bin/python bench/sweep.py --steps 300      # a quicker look

Three ways to train the same 16 networks, each in a process of its own (so peak memory is its own):
- `sweep`: one `sweep()` call, as a sweep job runs it: one stack of 8 settings per seed;
- `jobs_2_seeds`: 8 `train()` calls, one per setting, each training its 2 seeds stacked (a train job);
- `jobs_1_seed`: 16 `train()` calls, one per setting and seed (the plain way to search).
Every train spec names the sweep's hold-out (`holdout: 0.2`), so all three train on the same rows. Printed per
way: wall time (data, training, evaluation, checkpoints: what the engine does; the queue's hand-off per job comes
on top for separate jobs), peak resident memory, and the largest difference of any setting's test accuracy from
the sweep's. The queue and database are not part of this measurement.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GRID = {"method.sd_lambda": [0.1, 0.5, 1.0, 2.0], "method.sd_gamma": [0.0, [1.0, 0.5]]}
SEEDS = [0, 1]
HOLDOUT = 0.2


def settings() -> list[dict]:
    return [{"method.sd_lambda": lam, "method.sd_gamma": gamma} for lam in GRID["method.sd_lambda"]
            for gamma in GRID["method.sd_gamma"]]


def train_spec(setting: dict, seeds: list[int], steps: int) -> dict:
    return {"preset": "paper_cmnist_sd", "steps": steps, "eval_every": steps, "seeds": seeds, "holdout": HOLDOUT,
            "audit": False, "method": {"sd_lambda": setting["method.sd_lambda"],
                                       "sd_gamma": setting["method.sd_gamma"]}}


def run_way(way: str, steps: int) -> dict:
    """In this process: train the 16 networks `way`'s way; each setting's test accuracy (mean over seeds)."""
    from starvation.training import train
    from starvation.training.sweep import sweep

    out = pathlib.Path(tempfile.mkdtemp(prefix=f"bench-sweep-{way}-"))
    started = time.perf_counter()
    if way == "sweep":
        outcome = sweep({"preset": "paper_cmnist_sd", "steps": steps, "eval_every": steps, "seeds": SEEDS,
                         "holdout": HOLDOUT, "grid": GRID}, out_dir=out, device="cpu")
        tests = [s["test"]["accuracy"]["mean"] for s in outcome.result["settings"]]
        extra = {"chosen": outcome.result["chosen_params"], "stacks": len(outcome.result["execution"])}
    elif way == "jobs_2_seeds":
        tests = [train(train_spec(s, SEEDS, steps), out_dir=out / str(i), device="cpu")
                 .result["splits"]["test"]["accuracy"]["mean"] for i, s in enumerate(settings())]
        extra = {}
    else:
        tests = []
        for i, s in enumerate(settings()):
            per_seed = [train(train_spec(s, [seed], steps), out_dir=out / f"{i}-{seed}", device="cpu")
                        .result["splits"]["test"]["accuracy"]["mean"] for seed in SEEDS]
            tests.append(sum(per_seed) / len(per_seed))
        extra = {}
    return {"way": way, "wall_s": time.perf_counter() - started, "tests": tests,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2001)
    parser.add_argument("--way", choices=["sweep", "jobs_2_seeds", "jobs_1_seed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:  # a child: one way, its numbers as JSON on the last line
        print(json.dumps(run_way(args.way, args.steps)))
        return
    rows = []
    for way in ("sweep", "jobs_2_seeds", "jobs_1_seed"):
        child = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--way", way],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"  {way}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr)
    sweep_row = rows[0]
    print(f"8 settings x {len(SEEDS)} seeds of paper_cmnist_sd, {args.steps} steps, holdout {HOLDOUT}, CPU "
          f"(chosen: {sweep_row['chosen']}; {sweep_row['stacks']} stacks)")
    print(f"{'way':<14} {'wall s':>8} {'x sweep':>8} {'peak RSS MiB':>13} {'max |test diff|':>16}")
    for row in rows:
        diff = max(abs(a - b) for a, b in zip(row["tests"], sweep_row["tests"]))
        print(f"{row['way']:<14} {row['wall_s']:>8.1f} {row['wall_s'] / sweep_row['wall_s']:>8.2f} "
              f"{row['peak_rss_mib']:>13.0f} {diff:>16.4f}")
    print("test accuracy per setting (sweep):", ", ".join(f"{t:.3f}" for t in sweep_row["tests"]))


if __name__ == "__main__":
    main()
