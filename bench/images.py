"""Image folders at scale: registration time, a streaming job's memory and throughput, and on the shipped
spurious-background benchmark ERM against SD and against ERM's last layer refitted, with a ResNet-18.

    .venv/bin/python bench/images.py memory --sizes 5000 40000     # register through the API, train, audit
    .venv/bin/python bench/images.py groups --seeds 0 1 2           # worst-group accuracy, 3 seeds

Folders come from `starvation.datasets.backgrounds` (MNIST digits on backgrounds cut from scikit-image's shipped
photos; background agrees with the label in 95% of training images, independent of it at test) and are made once
under --work. `memory`: for each size, the POST that registers the folder is timed through a running API
(`scripts/serve.py`, embedded default), then its background check; then, each in a process of its own as a worker
child runs them, a ResNet-18 trains on the folder (minibatches read by GS_DATA_WORKERS=2 loader processes) and a
TorchScript CNN (a foreign model: it runs in the jail) is audited on it. Printed: each process's peak resident
memory and its children's (loader processes, the jail), wall time and images per second.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = 64  # pixels a side, as the 40,000-image acceptance folder


def folder(work: pathlib.Path, images: int, size: int) -> pathlib.Path:
    """A benchmark folder of `images` images (60% train, 10% val, 30% test), made once."""
    from starvation.datasets.backgrounds import make_background_folder

    path = work / f"backgrounds-{images}-{size}px"
    if not (path / "metadata.csv").exists():
        n_train, n_val = int(0.6 * images), int(0.1 * images)
        started = time.perf_counter()
        make_background_folder(path, n_train=n_train, n_val=n_val, n_test=images - n_train - n_val,
                               image_size=size, seed=0)
        print(f"made {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def peak_mib() -> dict:
    """Peak resident memory of this process and of its largest child (ru_maxrss: KiB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(own), "largest_child_peak_rss_mib": round(children)}


def register(work: pathlib.Path, name: str) -> dict:
    """POST the folder to a running API and time the answer, then the background check until ready."""
    from scripts.stack import Stack

    with tempfile.TemporaryDirectory() as var:
        stack = Stack("bench", {"GS_DATA_DIR": str(work), "GS_DATABASE_URL": f"sqlite:///{var}/gs.sqlite3",
                                "GS_BROKER_URL": "filesystem://"}, pathlib.Path(var), serve_args=("--no-worker",))
        stack.start()
        try:
            started = time.perf_counter()
            response = stack.client.post("/v1/datasets", data={"name": name, "format": "image_folder",
                                                                "folder": name, "image_size": str(SIZE)})
            answered = time.perf_counter() - started
            assert response.status_code == 202, response.text
            while (dataset := stack.client.get(f"/v1/datasets/{response.json()['id']}").json())["status"] == "pending":
                time.sleep(0.5)
            return {"post_s": round(answered, 3), "check_s": round(time.perf_counter() - started, 1),
                    "status": dataset["status"], "splits": dataset["description"].get("splits")}
        finally:
            stack.stop()


def run_train(path: pathlib.Path, steps: int, batch_size: int) -> dict:
    from starvation import datasets
    from starvation.training import train

    data = datasets.load_image_folder(path, path / "metadata.csv", path.name, SIZE, workers=2)
    spec = {"dataset": {"name": path.name}, "model": {"arch": "resnet18"}, "method": {"name": "erm"},
            "optimizer": {"name": "adam", "lr": 1e-3}, "steps": steps, "batch_size": batch_size,
            "eval_every": steps, "seeds": [0]}
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        outcome = train(spec, out_dir=pathlib.Path(out), dataset=data)
        wall = time.perf_counter() - started
    timing = outcome.result["timing"]
    evaluated = 2 * sum(data.info["splits"].values())  # every split at step 0 and at the end
    return {"steps": steps, "batch_size": batch_size, "wall_s": round(wall, 1),
            "train_images_per_s": round(steps * batch_size / timing["train_s"], 1),
            "eval_images_per_s": round(evaluated / timing["eval_s"], 1), **peak_mib()}


def run_audit(path: pathlib.Path) -> dict:
    import torch

    from core.settings import Settings
    from starvation import datasets
    from starvation.audit import run_audit as audit
    from starvation.networks import build_network
    from worker.audit_job import load_model

    data = datasets.load_image_folder(path, path / "metadata.csv", path.name, SIZE, workers=2)
    with tempfile.TemporaryDirectory() as out:
        network = build_network("cnn", {"channels": [32, 64, 128]}, (3, SIZE, SIZE), 1).eval()
        script = pathlib.Path(out) / "foreign.pt"
        torch.jit.save(torch.jit.script(network), str(script))
        model = load_model(str(script), "torchscript", {"input_shape": [3, SIZE, SIZE]}, "cpu", settings=Settings())
        try:
            started = time.perf_counter()
            report = audit(model, data, probes=None, spurious_attribute="attribute", seed=0, out_dir=pathlib.Path(out))
            wall = time.perf_counter() - started
        finally:
            model.close()
    test = len(data.splits[data.test_split])
    return {"wall_s": round(wall, 1), "test_images": test, "groups_add_up": sum(g["n"] for g in report["groups"]) == test,
            "test_images_per_s": round(test / wall, 1), "flip_rate": report["counterfactual"]["flip_rate"],
            **peak_mib()}


def in_process_of_its_own(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(args) -> None:
    for images in args.sizes:
        path = folder(args.work, images, SIZE)
        row = {"images": images, "register": register(args.work, path.name)}
        print(json.dumps(row), flush=True)
        row["train"] = in_process_of_its_own("_train", str(path), str(args.steps), str(args.batch_size))
        print(json.dumps(row), flush=True)
        row["audit"] = in_process_of_its_own("_audit", str(path))
        print(json.dumps(row), flush=True)


def groups(args) -> None:
    """ERM and SD ResNet-18s from scratch on one folder, and ERM's last layer refitted (group-balanced, on the
    training split's features), each audited on the test split."""
    import copy

    from starvation import datasets
    from starvation.audit import run_audit as audit
    from starvation.checkpoints import load_checkpoint
    from starvation.repair import TrainingFeatures, build_repair_method, read_head, replace_head
    from starvation.training import train

    path = folder(args.work, args.images, args.size)
    data = datasets.load_image_folder(path, path / "metadata.csv", path.name, args.size, workers=2)
    methods = {"erm": {"name": "erm"}, "sd": {"name": "sd", "sd_lambda": args.sd_lambda}}
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            for name, method in methods.items():
                spec = {"dataset": {"name": path.name}, "model": {"arch": "resnet18", "width": args.width},
                        "method": method, "optimizer": {"name": "adam", "lr": 1e-3}, "steps": args.steps,
                        "batch_size": 64, "eval_every": args.steps, "seeds": [seed]}
                started = time.perf_counter()
                outcome = train(spec, out_dir=pathlib.Path(out) / f"{name}{seed}", dataset=data)
                model = load_checkpoint(outcome.checkpoints[0].safetensors_path, "safetensors")
                rows.setdefault(name, []).append({**scored(audit, model, data, seed, out),
                                                  "wall_s": time.perf_counter() - started})
                if name == "erm":
                    started = time.perf_counter()
                    train_split = data.train_data()
                    features = datasets.batched(model.features, train_split.x, model.device, 256)
                    fitted = build_repair_method({"name": "last_layer"}).repair(
                        TrainingFeatures(features, train_split.y, train_split.attribute, list(data.train_splits)),
                        read_head(model.module), seed=seed)
                    fixed = copy.deepcopy(model)
                    replace_head(fixed.module, fitted.head)
                    rows.setdefault("erm + last_layer", []).append({**scored(audit, fixed, data, seed, out),
                                                                    "wall_s": time.perf_counter() - started})
            print(json.dumps({"seed": seed, **{name: runs[-1] for name, runs in rows.items()}}), flush=True)
    print(f"\n{len(args.seeds)} seed(s), ResNet-18 width {args.width}, {args.steps} steps of 64, {args.size}px; "
          "mean ± std over seeds")
    print(f"{'model':<20}{'test acc':>16}{'worst group':>16}{'flip rate':>16}{'wall s':>10}")
    for name, runs in rows.items():
        cells = [f"{statistics.fmean(r[k] for r in runs):.3f} ± {statistics.pstdev([r[k] for r in runs]):.3f}"
                 for k in ("test_accuracy", "worst_group_accuracy", "flip_rate")]
        print(f"{name:<20}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}{statistics.fmean(r['wall_s'] for r in runs):>10.0f}")


def scored(audit, model, data, seed: int, out: str) -> dict:
    report = audit(model, data, probes=["groups", "counterfactual"], spurious_attribute="attribute", seed=seed,
                   out_dir=pathlib.Path(out) / "audit")
    return {"test_accuracy": report["average_accuracy"], "worst_group_accuracy": report["worst_group_accuracy"],
            "flip_rate": report["counterfactual"]["flip_rate"]}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        print(json.dumps(run_train(pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_audit":
        print(json.dumps(run_audit(pathlib.Path(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/gs-bench-images"))
    parts = parser.add_subparsers(dest="part", required=True)
    mem = parts.add_parser("memory")
    mem.add_argument("--sizes", type=int, nargs="+", default=[5000, 40000])
    mem.add_argument("--steps", type=int, default=20)
    mem.add_argument("--batch-size", type=int, default=64)
    grp = parts.add_parser("groups")
    grp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    grp.add_argument("--images", type=int, default=6000)
    grp.add_argument("--size", type=int, default=32)
    grp.add_argument("--width", type=int, default=32)
    grp.add_argument("--steps", type=int, default=600)
    grp.add_argument("--sd-lambda", type=float, default=0.2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    (memory if args.part == "memory" else groups)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
