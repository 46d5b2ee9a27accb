"""Counts the host-device synchronisations of a short training run, by source line.

CUDA's sync debug mode warns at every operation that makes the host wait for the GPU. A
training loop that synchronises every step shows a line with one warning per step; ours
should show only the checkpoints' copies to the host and, once, the start of the throughput's
timing after the first epoch (step losses and validations are read back once they have
arrived).

    python benchmarks/count_syncs.py --data fashion.zip    # 3 epochs of vit-ti16-224, eager
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import warnings
from pathlib import Path

import torch

from components.train import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the archive to train on")
    parser.add_argument("--preset", default="vit-ti16-224")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--validate-every", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "count_syncs: needs a CUDA device (the sync debug mode is CUDA's)\n")

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        result = train(
            args.data,
            args.preset,
            Path(scratch),
            epochs=args.epochs,
            validate_every=args.validate_every,
            compile="off",
        )
        torch.cuda.set_sync_debug_mode(0)
    by_line = collections.Counter(
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()
    )
    print(f"{args.epochs} epochs of {args.preset}, validated after epochs {result['epochs']}")
    print("synchronisations  where")
    for line, count in by_line.most_common():
        print(f"{count:16d}  {line}")


if __name__ == "__main__":
    main()
