"""SD where the paper used it: a backbone pretrained upstream, where the background says nothing of the label, then
fine-tuned where the background agrees with the label in 95 % of training images.

    .venv/bin/python bench/pretrained.py --seeds 0 1 2

Upstream: `make_background_folder --labels digit` (ten digit classes, the background family independent of the digit
in every split); a ResNet-18 (width --width) is trained on it from scratch with ERM, as a train job would. Its
weights are the downstream networks' initial weights (`init_checkpoint_id` in a job; the head, ten logits, does not
fit the one downstream logit and starts fresh).

Downstream, on the folder of `bench/images.py groups` (binary label digit < 5, 95 % background agreement in train,
independent at test), each from the upstream weights:
- ERM: cross-entropy, SGD momentum 0.9 (the authors' Table 2 cross-entropy runs);
- SD: the authors' CelebA recipe (`paper_celeba_sd`: Adam, per-class targets 0.44 / 2.5, each class averaged on its
  own, sd_lambda 0.2 by PAPER.md's convention);
- Group DRO: SGD momentum 0.9, as ERM;
- ERM + last_layer: the chosen ERM network's head refitted group-balanced on its training features.
The learning rate of each method is chosen by a sweep with `train_domain_validation` (worst-group accuracy on 20 %
of the training split held out; the test split is never read) over --lrs on the first seed; the other seeds train
at the chosen rate. Printed per method: test and worst-group accuracy and the background-swap flip rate (mean ±
population std over seeds), and the NTK's centred alignment with the label and with the background on a 256-example
group-balanced sample of the training split, before fine-tuning (the upstream backbone with its fresh head) and after.
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

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench.common import mean_std  # noqa: E402
from bench.images import folder, scored  # noqa: E402
from starvation import datasets  # noqa: E402
from starvation.audit import run_audit as audit  # noqa: E402
from starvation.checkpoints import load_checkpoint  # noqa: E402
from starvation.datasets.backgrounds import make_background_folder  # noqa: E402
from starvation.networks import build_network  # noqa: E402
from starvation.ntk import balanced_sample, centred_alignment, ntk_gram  # noqa: E402
from starvation.repair import TrainingFeatures, build_repair_method, read_head, replace_head  # noqa: E402
from starvation.training import train  # noqa: E402
from starvation.training.sweep import sweep  # noqa: E402
from starvation.weights import load_initial_weights  # noqa: E402

SGD = {"name": "sgd", "momentum": 0.9}
METHODS = {
    "ERM": ({"name": "erm"}, SGD),
    "SD": ({"name": "sd", "sd_lambda": 0.2, "sd_gamma": [0.44, 2.5], "per_class_mean": True}, {"name": "adam"}),
    "Group DRO": ({"name": "group_dro"}, SGD),
}
NTK_EXAMPLES = 256


def upstream(args, out: pathlib.Path) -> dict[str, torch.Tensor]:
    """The upstream ResNet-18's state dict, trained once under --work and reused."""
    weights = args.work / f"upstream-{args.size}px-w{args.width}-{args.upstream_steps}.safetensors"
    if not weights.exists():
        path = args.work / f"digits-{args.size}px"
        if not (path / "metadata.csv").exists():
            make_background_folder(path, n_train=6000, n_val=600, n_test=1200, image_size=args.size, seed=1,
                                   labels="digit")
        data = datasets.load_image_folder(path, path / "metadata.csv", path.name, args.size, workers=2)
        spec = {"dataset": {"name": path.name}, "model": {"arch": "resnet18", "width": args.width},
                "method": {"name": "erm"}, "optimizer": {"name": "adam", "lr": 1e-3}, "steps": args.upstream_steps,
                "batch_size": 64, "eval_every": args.upstream_steps, "seeds": [0]}
        started = time.perf_counter()
        outcome = train(spec, out_dir=out / "upstream", dataset=data)
        print(json.dumps({"upstream_s": round(time.perf_counter() - started), "splits": outcome.result["splits"]}),
              flush=True)
        weights.write_bytes(pathlib.Path(outcome.checkpoints[0].safetensors_path).read_bytes())
    return load_file(str(weights))


def alignments(module: torch.nn.Module, sample: torch.Tensor, y: torch.Tensor, attribute: torch.Tensor) -> dict:
    module.eval()
    gram = ntk_gram(module, sample)
    return {"label": centred_alignment(gram, y), "background": centred_alignment(gram, attribute)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/gs-bench-images"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--upstream-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    rows: dict[str, list[dict]] = {}
    chosen_lr: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        init = upstream(args, out)
        path = folder(args.work, args.images, args.size)
        data = datasets.load_image_folder(path, path / "metadata.csv", path.name, args.size, workers=2)
        train_split = data.train_data()
        picked = torch.from_numpy(balanced_sample(train_split.y, train_split.attribute, seed=0,
                                                  max_examples=NTK_EXAMPLES))
        sample = train_split.x[picked].load()
        y, attribute = train_split.y[picked], train_split.attribute[picked]
        for seed in args.seeds:
            for name, (method, optimizer) in METHODS.items():
                spec = {"dataset": {"name": path.name}, "model": {"arch": "resnet18", "width": args.width},
                        "method": method, "optimizer": {**optimizer, "lr": args.lrs[0]}, "steps": args.steps,
                        "batch_size": 64, "eval_every": args.steps, "holdout": 0.2, "seeds": [seed]}
                started = time.perf_counter()
                if name not in chosen_lr:  # the first seed: a sweep over the learning rate chooses it
                    found = sweep({**spec, "grid": {"optimizer.lr": args.lrs}, "selection": "train_domain_validation"},
                                  out_dir=out / f"sweep-{name}", dataset=data, init_weights=init,
                                  user_datasets=[path.name])
                    chosen = found.result["chosen"]
                    chosen_lr[name] = found.result["chosen_params"]["optimizer.lr"]
                    print(json.dumps({"method": name, "sweep": found.result["settings"],
                                      "chosen_lr": chosen_lr[name]}), flush=True)
                    trained = found.checkpoints[chosen][0]
                else:
                    spec["optimizer"]["lr"] = chosen_lr[name]
                    trained = train(spec, out_dir=out / f"{name}{seed}", dataset=data, init_weights=init).checkpoints[0]
                model = load_checkpoint(trained.safetensors_path, "safetensors")
                torch.manual_seed(seed)
                before = build_network("resnet18", {"width": args.width}, data.input_shape, 1)
                load_initial_weights(before, init)
                ntk = {"before": alignments(before, sample, y, attribute),
                       "after": alignments(copy.deepcopy(model.module), sample, y, attribute)}
                rows.setdefault(name, []).append({**scored(audit, model, data, seed, tmp), "ntk": ntk,
                                                  "wall_s": time.perf_counter() - started})
                if name == "ERM":
                    features = datasets.batched(model.features, train_split.x, model.device, 256)
                    fitted = build_repair_method({"name": "last_layer"}).repair(
                        TrainingFeatures(features, train_split.y, train_split.attribute, list(data.train_splits)),
                        read_head(model.module), seed=seed)
                    fixed = copy.deepcopy(model)
                    replace_head(fixed.module, fitted.head)
                    refitted = {"before": ntk["before"], "after": alignments(fixed.module, sample, y, attribute)}
                    rows.setdefault("ERM + last_layer", []).append(
                        {**scored(audit, fixed, data, seed, tmp), "ntk": refitted, "wall_s": 0.0})
            print(json.dumps({"seed": seed, **{name: runs[-1] for name, runs in rows.items()}}), flush=True)

    print(f"\n{len(args.seeds)} seed(s); ResNet-18 width {args.width} pretrained {args.upstream_steps} steps upstream, "
          f"fine-tuned {args.steps} steps of 64 at {args.size}px; learning rates chosen: {chosen_lr}")
    print("| model | test accuracy | worst-group accuracy | flip rate | NTK label before -> after "
          "| NTK background before -> after |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in rows.items():
        cells = [mean_std([r[k] for r in runs]) for k in ("test_accuracy", "worst_group_accuracy", "flip_rate")]
        ntk = [f"{statistics.fmean(r['ntk']['before'][k] for r in runs):.3f} -> "
               f"{statistics.fmean(r['ntk']['after'][k] for r in runs):.3f}" for k in ("label", "background")]
        print(f"| {name} | {' | '.join(cells)} | {' | '.join(ntk)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
