"""Memory and time of the `ntk` probe on a paper-size network: the paper's Colored MNIST MLP (starvation/presets.py,
`paper_cmnist_sd`'s model) on a 1,024-example group-balanced sample, as an audit job runs it.

    python bench/ntk_memory.py [--hidden 300,300] [--examples 1024]

Prints the process's peak resident memory before the probe (data and network loaded) and after it, and the probe's
wall time; docs/performance.md keeps the numbers."""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import machine, peak_memory_mib  # noqa: E402
from starvation import datasets, networks, presets  # noqa: E402
from starvation import ntk  # noqa: E402
from starvation.audit import run_audit  # noqa: E402
from starvation.checkpoints import wrap_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default=None, help="hidden widths, e.g. 300,300 (default: the preset's)")
    parser.add_argument("--examples", type=int, default=ntk.MAX_EXAMPLES)
    args = parser.parse_args()
    device = torch.device("cpu")
    print(machine(device))
    model_spec = dict(presets.PRESETS["paper_cmnist_sd"]["model"])
    params = dict(model_spec.get("params") or {})
    if args.hidden:
        params["hidden"] = [int(w) for w in args.hidden.split(",")]
    data = datasets.build("colored_mnist", {}, seed=0, data_dir=None)
    network = networks.build_network(model_spec["arch"], params, tuple(data.input_shape), 1)
    n_params = sum(p.numel() for p in network.parameters())
    ntk.MAX_EXAMPLES = args.examples
    before = peak_memory_mib(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        report = run_audit(wrap_module(network), data, probes=["ntk"], spurious_attribute="color", seed=0,
                           out_dir=pathlib.Path(out))["ntk"]
    took = time.perf_counter() - started
    after = peak_memory_mib(device)
    print(f"network {model_spec['arch']} {params} ({n_params:,} parameters); sample of {report['sample']['n']} examples")
    print(f"peak resident memory: {before:.0f} MiB before the probe, {after:.0f} MiB after; probe wall time {took:.1f} s")
    print(f"alignment: {report['alignment']}")


if __name__ == "__main__":
    main()
