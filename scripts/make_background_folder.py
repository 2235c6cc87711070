"""Write a Waterbirds-layout image folder with a spurious background (starvation/datasets/backgrounds.py), offline.

    python scripts/make_background_folder.py OUT --train 32000 --val 4000 --test 4000 --size 64 --seed 0
    python scripts/make_background_folder.py UPSTREAM --labels digit     # balanced upstream: 10 classes, background
                                                                         # independent of the label, to pretrain on

OUT must be absent or empty. It gets images/, counterfactual/ and masks/ (one PNG per example and split),
metadata.csv (path,label,attribute,split,counterfactual,mask) and info.json; the counts per split and
(label, attribute) group are printed as JSON. The same arguments give byte-identical folders.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from starvation.datasets.backgrounds import make_background_folder  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write (absent or empty)")
    parser.add_argument("--train", type=int, default=4795, help="training images (default 4795, as Waterbirds)")
    parser.add_argument("--val", type=int, default=1199, help="validation images (default 1199, as Waterbirds)")
    parser.add_argument("--test", type=int, default=5794, help="test images (default 5794, as Waterbirds)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (16-512; default 64)")
    parser.add_argument("--agreement", type=float, default=0.95,
                        help="in train, the fraction of each label whose background family goes with it (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, a non-negative integer (default 0)")
    parser.add_argument("--labels", choices=["binary", "digit"], default="binary",
                        help="binary: digit < 5, the background agreeing with it as --agreement says (default); "
                             "digit: the digit (10 classes), the background independent of it in every split")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    try:
        counts = make_background_folder(args.out, n_train=args.train, n_val=args.val, n_test=args.test,
                                        image_size=args.size, agreement=args.agreement, seed=args.seed,
                                        labels=args.labels)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2))
    total = sum(split["n"] for split in counts.values())
    print(f"{total} images in {time.perf_counter() - start:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
