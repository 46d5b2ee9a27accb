"""Data-parallel training throughput: one process against W ranks, the `components.train`
command end to end, the same global batch, timed after the first epoch (train.json's
``images_per_second``, the whole job's).

On GPUs: 1 rank on one GPU against a rank on each of W GPUs; the scaling efficiency is
W-rank images/s / (W x 1-rank images/s). On a CPU the ranks share the same cores: one process
with all of them as threads against W processes with an equal share each, so the ratio says
which use of the cores trains faster, not how it scales.

    python benchmarks/data_parallel.py --data fashion-mnist-headgear-layout.zip             # a GPU machine
    python benchmarks/data_parallel.py --data fashion-mnist-headgear-layout.zip --device cpu --preset cpu-10min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from components.common import cli
from components.common.devices import describe_device, pick_device


def timed_run(data: str, preset: str, epochs: int, device: str, ranks: int, threads: int, folder: Path) -> float:
    """images/s of one training run of ``ranks`` processes with ``threads`` each."""
    output = folder / f"ranks-{ranks}"
    command = [sys.executable, "-m", "components.train", "--data", data, "--preset", preset, "--output", str(output)]
    command += ["--epochs", str(epochs), "--device", device, "--ranks", str(ranks), "--checkpoint-minutes", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CLEARML_OFFLINE_MODE": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    if finished.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    return json.loads((output / "train.json").read_text())["images_per_second"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a zip or folder in the headgear layout")
    parser.add_argument("--preset", default=None, help="preset (default: vit-ti16-224 on a GPU, else cpu-10min)")
    parser.add_argument("--epochs", type=cli.positive_int, default=3, help="epochs per run, the first untimed (3)")
    parser.add_argument("--ranks", type=cli.positive_int, default=None, help="W (default: the GPUs, or the cores)")
    cli.add_device_flag(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    preset = args.preset or ("vit-ti16-224" if on_gpu else "cpu-10min")
    cores = len(os.sched_getaffinity(0))
    world = args.ranks or (torch.cuda.device_count() if on_gpu else cores)
    rows = []
    with tempfile.TemporaryDirectory(prefix="data-parallel-") as folder:
        for ranks in (1, world):
            threads = max(1, cores // ranks) if not on_gpu else max(1, cores // world)
            rate = timed_run(args.data, preset, args.epochs, device.type, ranks, threads, Path(folder))
            rows.append((ranks, threads, rate))
    single = rows[0][2]
    print(f"{preset}, {args.epochs} epochs (the first untimed), {describe_device(device)}, torch {torch.__version__}")
    print("| ranks | threads per rank | images/s | vs 1 rank | scaling efficiency |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for ranks, threads, rate in rows:
        efficiency = f"{rate / (ranks * single):.0%}" if on_gpu else "(same cores)"
        print(f"| {ranks} | {threads} | {rate:.0f} | {rate / single:.2f}x | {efficiency} |")


if __name__ == "__main__":
    main()
