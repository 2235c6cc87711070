"""The GPU check: what a lent GPU machine must show, most valuable first, in one process of under 5 minutes.

On the device machine (via `bench/gpu_check.sh`, which puts the carried wheels on PYTHONPATH first):
    python3 bench/gpu_check.py --out "$OUT"
Here, on the CPU with tiny sizes, in a venv holding only what the device image holds (`make gpu-dryrun`):
    python3 bench/gpu_check.py --dry-run --out /tmp/gpu-dryrun

Writes into --out, each file as it goes (a run cut at its limit still returns what it finished):
  1_protocol.txt    the 10-seed protocol (ERM 1,001 + SD 2,001 steps, batched) at 40,000 tiled images and at the
                    4,000 shipped ones: bf16 and TF32 with CUDA graphs, with and without torch.compile, first; then
                    the fp32 sequential references; last, what padding hidden widths is worth. Per run the training
                    time (updates and evaluations), compile time, test accuracy, peak GPU memory; the goals (<= 10 s
                    at 40k, <= 3 s at 4k, accuracy within 1 point of the fp32 sequential run) checked at the end.
                    1_protocol.jsonl holds the same as JSON lines.
  2_tests.txt       tests/science/test_cuda.py and the audit's GPU test
  3_profile.txt     torch.profiler's table of 200 batched SD updates at 40k, bf16, eager (graphs hide kernels)
A re-run that has the references and the tests' verdict already: --no-references --no-tests.
  0_env.txt         the GPU, driver, torch, and how long each part took
Only the science package is imported: the device image has no fastapi, sqlalchemy, celery (or mlxtend: carried).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import TextIO

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import machine, write_tiled_mnist  # noqa: E402
from starvation.training import loop, train  # noqa: E402

TASKS = {"erm": ("paper_cmnist_erm", 1001), "sd": ("paper_cmnist_sd", 2001)}
BIG = 40_000  # tiled training images of the 40k runs
GOAL_S = {BIG: 10.0, None: 3.0}  # training time of the protocol (ERM + SD), by n_train (None: the 4,000 shipped)
AGREEMENT_POINTS = 1.0
# (n_train, precision, cuda_graphs, compile, execution, hidden width multiple), most valuable first: the runs that
# decide the goals, then the fp32 sequential references they are held against (skipped by a re-run that already
# has them: --no-references), then the padding's worth (the paper's 390 units, not padded to 392).
PADDED = None  # the loop's own: starvation.training.loop.GPU_WIDTH_MULTIPLE
RUNS = [
    (BIG, "bf16", True, True, "batched", PADDED),
    (BIG, "bf16", True, False, "batched", PADDED),
    (None, "bf16", True, True, "batched", PADDED),
    (None, "tf32", True, False, "batched", PADDED),
    (BIG, "tf32", True, False, "batched", PADDED),
    (None, "bf16", True, False, "batched", PADDED),
]
REFERENCES = [(None, "fp32", False, False, "sequential", PADDED), (BIG, "fp32", False, False, "sequential", PADDED)]
COMPARISONS = [(BIG, "bf16", True, False, "batched", 1)]
PROFILE_STEPS = 200
DRY_N_TRAIN = 200  # the dry run's training digits, for "4k" and "40k" alike


class Report:
    """Lines into one file of the output folder, flushed as they come, echoed to stdout."""

    def __init__(self, path: pathlib.Path) -> None:
        self.file = path.open("a")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def label(n_train: int | None, precision: str, graphs: bool, compiled: bool, execution: str,
          multiple: int | None) -> str:
    size = "40k" if n_train == BIG else "4k"
    return (f"{size} {precision} {execution}" + (" graphs" if graphs else "") + (" compiled" if compiled else "")
            + (" unpadded" if multiple == 1 else ""))


def protocol_run(config: tuple, args: argparse.Namespace, data_dir: str) -> dict:
    """ERM then SD with the config's options; per task its timing, test accuracy and peak memory."""
    n_train, precision, graphs, compiled, execution, multiple = config
    device = torch.device(args.device)
    row = {"run": label(*config), "n_train": n_train or 4000, "precision": precision, "cuda_graphs": graphs,
           "compile": compiled, "execution": execution,
           "width_multiple": loop.GPU_WIDTH_MULTIPLE if multiple is None else multiple}
    for task, (preset, steps) in TASKS.items():
        steps = args.steps or steps
        spec = {"preset": preset, "seeds": list(range(args.seeds)), "steps": steps, "eval_every": max(1, steps // 10),
                "execution": execution, "precision": precision, "cuda_graphs": graphs, "compile": compiled,
                "audit": False}
        if n_train is not None or args.dry_run:
            spec["dataset"] = {"params": {"n_train": DRY_N_TRAIN if args.dry_run else n_train}}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started, default = time.perf_counter(), loop.GPU_WIDTH_MULTIPLE
        loop.GPU_WIDTH_MULTIPLE = default if multiple is None else multiple
        try:
            with tempfile.TemporaryDirectory() as out:
                result = train(spec, out_dir=pathlib.Path(out), device=str(device),
                               data_dir=data_dir if n_train is not None else None).result
        finally:
            loop.GPU_WIDTH_MULTIPLE = default
        timing = result["timing"]
        row[task] = {"steps": steps, "loop_s": timing["train_s"] + timing["eval_s"], "train_s": timing["train_s"],
                     "eval_s": timing["eval_s"], "compile_s": timing["compile_s"], "wall_s": time.perf_counter() - started,
                     "test": result["splits"]["test"]["accuracy"]["mean"],
                     "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                     "used": result["execution"]}
    row["protocol_s"] = row["erm"]["loop_s"] + row["sd"]["loop_s"]
    return row


def warm_up(args: argparse.Namespace, report: Report) -> None:
    """The table's header, then a short run off the clock: CUDA context, cuBLAS handles, first kernels."""
    report(f"{args.seeds} seeds; ERM {args.steps or TASKS['erm'][1]} + SD {args.steps or TASKS['sd'][1]} steps; "
           f"40k = the shipped digits tiled (bench.common.write_tiled_mnist), 4k = the shipped digits")
    report("protocol s = the updates and evaluations of ERM + SD (the goals' clock); compile s comes before it")
    report(f"{'run':34} {'protocol s':>10} {'ERM s':>7} {'SD s':>7} {'compile s':>9} {'ERM test':>8} "
           f"{'SD test':>8} {'peak MiB':>9}")
    warm = (None, "bf16", True, False, "batched", PADDED)
    protocol_run(warm, argparse.Namespace(**{**vars(args), "steps": 20, "seeds": 2}), args.tiled_dir)


def protocol(args: argparse.Namespace, report: Report, jsonl: TextIO, runs: list[tuple], rows: list[dict],
             deadline: float) -> None:
    """`runs` in order, each appended to `rows` and reported as it ends; those not begun by `deadline` skipped."""
    data_dir = args.tiled_dir
    for config in runs:
        if time.monotonic() > deadline:
            report(f"{label(*config):34} skipped: past the time budget")
            continue
        try:
            row = protocol_run(config, args, data_dir)
        except Exception as exc:  # one broken option must not cost the rest of the check
            report(f"{label(*config):34} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            args.failures += 1
            continue
        rows.append(row)
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()
        peak = max(row["erm"]["peak_mib"] or 0, row["sd"]["peak_mib"] or 0)
        report(f"{row['run']:34} {row['protocol_s']:10.2f} {row['erm']['loop_s']:7.2f} {row['sd']['loop_s']:7.2f} "
               f"{row['erm']['compile_s'] + row['sd']['compile_s']:9.1f} {100 * row['erm']['test']:8.2f} "
               f"{100 * row['sd']['test']:8.2f} {peak:9.0f}")


def goals(rows: list[dict]) -> list[str]:
    """Each batched run against its size's time goal and the fp32 sequential run's accuracy."""
    references = {row["n_train"]: row for row in rows if row["execution"] == "sequential"}
    lines = []
    for row in rows:
        if row["execution"] != "batched":
            continue
        goal = GOAL_S[BIG if row["n_train"] == BIG else None]
        line = (f"{row['run']:34} {row['protocol_s']:.2f} s against {goal:.0f} s: "
                f"{'met' if row['protocol_s'] <= goal else 'MISSED'}")
        reference = references.get(row["n_train"])
        if reference is not None:
            gaps = {task: 100 * abs(row[task]["test"] - reference[task]["test"]) for task in TASKS}
            agree = all(gap <= AGREEMENT_POINTS for gap in gaps.values())
            line += (f"; test accuracy vs fp32 sequential: ERM {gaps['erm']:.2f}, SD {gaps['sd']:.2f} points "
                     f"({'within' if agree else 'NOT within'} {AGREEMENT_POINTS:g})")
        lines.append(line)
    return lines


def tests(args: argparse.Namespace, folder: pathlib.Path, timeout_s: float) -> None:
    """The CUDA tests in a subprocess (skipped, not errored, without CUDA: what the dry run shows)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/science/test_cuda.py",
               "tests/science/test_audit.py::test_the_audit_runs_a_model_on_the_gpu"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        output = done.stdout + done.stderr + f"\nexit status {done.returncode}\n"
        args.failures += done.returncode != 0
    except subprocess.TimeoutExpired as exc:
        output = f"{exc.stdout or ''}{exc.stderr or ''}\nstopped after {timeout_s:.0f} s\n"
        args.failures += 1
    (folder / "2_tests.txt").write_text(output)
    print(output[-3000:], flush=True)


def profile(args: argparse.Namespace, folder: pathlib.Path) -> None:
    """torch.profiler over PROFILE_STEPS eager batched SD updates (bf16) at 40k: where an update's time goes."""
    from torch.profiler import ProfilerActivity

    from starvation.datasets import build
    from starvation.ensemble import StackedMLP
    from starvation.methods import build_method
    from starvation.networks import build_network
    from starvation.presets import PRESETS
    from starvation.training import build_optimizer, resolve_train_spec, stacked_train_step
    from starvation.training.update import update_inputs

    device = torch.device(args.device)
    spec = resolve_train_spec({"preset": "paper_cmnist_sd"})
    data = build("colored_mnist", {**spec["dataset"]["params"], "n_train": DRY_N_TRAIN if args.dry_run else BIG},
                 seed=0, data_dir=args.tiled_dir)
    train_data = data.train_data()
    x = update_inputs(train_data.x.unsqueeze(0).expand(args.seeds, *train_data.x.shape).contiguous().to(device),
                      "bf16")
    y = train_data.y.unsqueeze(0).expand(args.seeds, -1).contiguous().to(device)
    networks = [build_network("mlp", {k: v for k, v in spec["model"].items() if k != "arch"}, data.input_shape, 1)
                for _ in range(args.seeds)]
    model = StackedMLP(networks, pad_to=loop.GPU_WIDTH_MULTIPLE if device.type == "cuda" else 1).to(device)
    method, optimizer = build_method(PRESETS["paper_cmnist_sd"]["method"]), build_optimizer(spec["optimizer"],
                                                                                             model.parameters())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step = 1000  # after SD's warm-up
    for _ in range(5):
        stacked_train_step(model, optimizer, method, x, y, step, precision="bf16")
    steps = 5 if args.dry_run else PROFILE_STEPS
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            stacked_train_step(model, optimizer, method, x, y, step, precision="bf16")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=30)
    header = (f"{steps} eager batched SD updates, {args.seeds} seeds, {x.shape[1]} images, bf16 inputs and "
              f"autocast, hidden widths {[p.shape[1] for p in model.stacked[:-2:2]]}, fused Adam on a GPU; "
              f"sorted by {sort}\n")
    (folder / "3_profile.txt").write_text(header + table + "\n")
    print(header + table[-4000:], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/gpu-check")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU, tiny sizes: proves the script starts and runs each part (make gpu-dryrun)")
    parser.add_argument("--budget-s", type=float, default=240,
                        help="goal and comparison runs not begun this many seconds after the start are skipped")
    parser.add_argument("--no-references", action="store_true",
                        help="a re-run: skip the fp32 sequential references (unchanged since the last run)")
    parser.add_argument("--no-tests", action="store_true", help="a re-run: skip the CUDA tests")
    args = parser.parse_args()
    args.device = "cpu" if args.dry_run else "cuda"
    args.seeds = 2 if args.dry_run else 10
    args.steps = 4 if args.dry_run else None
    args.failures = 0  # runs, parts or tests that failed: the exit status (the dry run in `make test` fails on any)
    folder = pathlib.Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    env = Report(folder / "0_env.txt")
    env(machine(torch.device(args.device)))
    if args.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        env(f"{properties.name}: {properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    with tempfile.TemporaryDirectory(prefix="tiled-mnist-") as tiled:
        args.tiled_dir = str(write_tiled_mnist(pathlib.Path(tiled)))
        rows: list[dict] = []
        report, jsonl = Report(folder / "1_protocol.txt"), (folder / "1_protocol.jsonl").open("a")
        runs = [run for index, run in enumerate(RUNS) if index == 0 or not (args.dry_run and run[3])]  # one compile
        parts = [("warm-up", lambda: warm_up(args, report)),
                 ("protocol", lambda: protocol(args, report, jsonl, runs, rows, deadline=began + args.budget_s)),
                 ("references", lambda: protocol(args, report, jsonl, [] if args.no_references else REFERENCES,
                                                 rows, deadline=float("inf"))),
                 ("tests", lambda: None if args.no_tests else tests(args, folder, timeout_s=150)),
                 ("profile", lambda: profile(args, folder)),
                 ("comparisons", lambda: protocol(args, report, jsonl, COMPARISONS, rows,
                                                  deadline=began + args.budget_s))]
        for name, part in parts:
            started = time.monotonic()
            try:
                part()
                env(f"{name}: {time.monotonic() - started:.1f} s")
            except Exception as exc:
                args.failures += 1
                env(f"{name}: FAILED after {time.monotonic() - started:.1f} s: {type(exc).__name__}: {exc}")
        report()
        for line in goals(rows):
            report(line)
    env(f"total: {time.monotonic() - began:.1f} s; {args.failures} failure(s)")
    return 1 if args.failures else 0


if __name__ == "__main__":
    sys.exit(main())
