"""The zoo's repairs: every model of tests/zoo.py, as TorchScript and as ONNX, refitted by `last_layer`.

    .venv/bin/python bench/zoo.py                 # all 4,000 training digits of the bundled Colored MNIST
    .venv/bin/python bench/zoo.py --n-train 1000  # what the tests train on

Each model is trained with plain PyTorch (ERM, full batch, 60 Adam steps), exported, loaded as an upload is,
its head and features found in its graph, and repaired as a repair job does (tests.zoo.repair_last_layer: the
default `last_layer` method, fitted and chosen on the training splits, written back where the head was read, the
file reloaded and checked). Printed: a Markdown table of the colour-swap flip rate and the test accuracy before
and after, on the test split.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=None, help="training digits (default: all)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from starvation.checkpoints import load_checkpoint
    from tests import zoo

    print("| model | format | head | features | output | flip rate before → after | drop | "
          "test accuracy before → after |")
    print("|---|---|---|---|---|---|---|---|")
    drops = []
    started = time.perf_counter()
    for name, fmt in zoo.CASES:
        data = zoo.exported(name, fmt, args.n_train)
        head = load_checkpoint(data, fmt, input_shape=zoo.INPUT_SHAPE).head_site
        repaired = zoo.repair_last_layer(data, fmt, args.n_train)
        (flips, accuracy), (flips_after, accuracy_after) = repaired.before, repaired.after
        drops.append(flips - flips_after)
        print(f"| {name} | {fmt} | `{head.node}` | `{head.features}` | {head.output_form} | "
              f"{flips:.3f} → {flips_after:.3f} | {flips - flips_after:.3f} | {accuracy:.3f} → {accuracy_after:.3f} |",
              flush=True)
    print(f"\n{len(drops)} model files; smallest drop {min(drops):.3f}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
