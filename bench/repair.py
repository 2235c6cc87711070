"""ERM from our own training engine, then each repair method, against SD trained from scratch.

    .venv/bin/python bench/repair.py                 # 3 seeds, the paper's steps (ERM 1,001, SD 2,001)
    .venv/bin/python bench/repair.py --seeds 1 --erm-steps 300 --sd-steps 600   # a quick look
    .venv/bin/python bench/repair.py --no-sd         # ERM and its repairs only

Per seed: train `paper_cmnist_erm`, refit its head with every repair method (the same code a
repair job runs on our safetensors checkpoints: features of the training splits only, a
validation part carved from them), fine-tune the whole network with SD (`finetune_sd`, its defaults), and train
`paper_cmnist_sd` from scratch. Each model is
audited on the test split (groups + counterfactual). Printed: mean and std over seeds of test
accuracy, worst-group accuracy, colour-swap flip rate, and wall time (for a repair: features,
fits and choice; for SD: the whole training run).
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def trained(preset: str, seed: int, steps: int, out: pathlib.Path, data_dir: str | None):
    from starvation.checkpoints import load_checkpoint
    from starvation.training import train

    started = time.perf_counter()
    outcome = train({"preset": preset, "seeds": [seed], "steps": steps, "eval_every": steps, "audit": False},
                    out_dir=out / preset, device="cpu", data_dir=data_dir)
    ckpt = outcome.checkpoints[0]
    model = load_checkpoint(ckpt.safetensors_path, "safetensors")
    return model, time.perf_counter() - started, ckpt.safetensors_path


def finetuned(weights_path: pathlib.Path, dataset, seed: int, out: pathlib.Path, data_dir: str | None):
    """`finetune_sd` with its defaults, as a repair job runs it (`starvation.repair.finetune`)."""
    from safetensors.torch import load_file

    from starvation.checkpoints import load_checkpoint
    from starvation.repair import build_repair_method
    from starvation.repair.finetune import finetune_sd, train_candidates

    started = time.perf_counter()
    method = build_repair_method({"name": "finetune_sd"})
    model_info = {"arch": "mlp", "arch_params": {"hidden": [300, 300]}}
    run = train_candidates(method, {"name": "colored_mnist"}, dataset, model_info, load_file(weights_path), seed,
                           out_dir=out / "finetune", data_dir=data_dir, registered=False)
    done = finetune_sd(method, dataset, run, original=load_checkpoint(weights_path, "safetensors").logits)
    model, _ = done.kept
    return model, time.perf_counter() - started, done.candidates[done.chosen]["sd_lambda"]


def audited(model, dataset, seed: int, out: pathlib.Path) -> dict:
    from starvation.audit import run_audit

    report = run_audit(model, dataset, probes=["groups", "counterfactual"], spurious_attribute="color", seed=seed,
                       out_dir=out)
    return {"test_accuracy": report["average_accuracy"], "worst_group_accuracy": report["worst_group_accuracy"],
            "flip_rate": report["counterfactual"]["flip_rate"]}


def repaired(model, dataset, method: str, seed: int):
    from starvation.datasets import batched
    from starvation.repair import TrainingFeatures, build_repair_method, read_head, replace_head

    started = time.perf_counter()
    train = dataset.train_data()
    features = batched(model.features, train.x, model.device, 1024)
    result = build_repair_method({"name": method}).repair(
        TrainingFeatures(features, train.y, train.attribute, list(dataset.train_splits)), read_head(model.module),
        seed=seed)
    new = copy.deepcopy(model)
    replace_head(new.module, result.head)
    return new, time.perf_counter() - started, result.selection["chosen"]


def main() -> int:
    from starvation import datasets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--erm-steps", type=int, default=1001)
    parser.add_argument("--sd-steps", type=int, default=2001)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-sd", action="store_true", help="skip SD from scratch (about 9 min a seed on 2 CPUs)")
    args = parser.parse_args()

    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder)
        for seed in range(args.seeds):
            dataset = datasets.build("colored_mnist", {}, seed=seed, data_dir=args.data_dir)  # what the seed trained on
            erm, erm_s, erm_path = trained("paper_cmnist_erm", seed, args.erm_steps, out / f"seed{seed}", args.data_dir)
            rows.setdefault("erm", []).append({**audited(erm, dataset, seed, out / "a"), "wall_s": erm_s})
            model, seconds, chosen = finetuned(erm_path, dataset, seed, out / f"seed{seed}", args.data_dir)
            rows.setdefault("erm + finetune_sd", []).append(
                {**audited(model, dataset, seed, out / "a"), "wall_s": seconds, "chosen": chosen})
            for method in ("last_layer", "last_layer_sd"):
                model, seconds, chosen = repaired(erm, dataset, method, seed)
                rows.setdefault(f"erm + {method}", []).append(
                    {**audited(model, dataset, seed, out / "a"), "wall_s": seconds, "chosen": chosen})
            if not args.no_sd:
                sd, sd_s, _ = trained("paper_cmnist_sd", seed, args.sd_steps, out / f"seed{seed}", args.data_dir)
                rows.setdefault("sd from scratch", []).append({**audited(sd, dataset, seed, out / "a"), "wall_s": sd_s})
            print(json.dumps({"seed": seed, **{name: runs[-1] for name, runs in rows.items()}}), flush=True)

    print(f"\n{args.seeds} seed(s); ERM {args.erm_steps} steps, SD {args.sd_steps} steps; mean ± std over seeds")
    print(f"{'model':<24}{'test acc':>16}{'worst group':>16}{'flip rate':>16}{'wall s':>12}")
    for name, runs in rows.items():
        cells = []
        for key in ("test_accuracy", "worst_group_accuracy", "flip_rate", "wall_s"):
            values = [r[key] for r in runs]
            std = statistics.pstdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} ± {std:.3f}" if key != "wall_s" else f"{statistics.fmean(values):.1f}")
        print(f"{name:<24}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}{cells[3]:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
