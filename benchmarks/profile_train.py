"""Where the training component's time goes: torch.profiler over a short run of
``components.train``, the operations that took the most device time, and how busy the device
was while training.

Busy fraction = device time per trained image x images/s (timed after the first epoch, under
the profiler's own overhead): near 1, the device never waits and what remains is the work of
the extra kernels (augmentation, mixup, clipping, the loss); well below 1, it waits for the
host (Python, synchronisations).

    python benchmarks/profile_train.py --data fashion.zip   # 8 epochs of vit-ti16-224, compiled on a GPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from components.common import cli
from components.common.augment import len_epoch
from components.common.data import resolve
from components.common.devices import pick_device
from components.common.presets import preset
from components.train import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the archive to train on")
    parser.add_argument("--preset", default="vit-ti16-224", help="training preset (default: vit-ti16-224)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs, one validation at the end (default: 8)")
    parser.add_argument("--rows", type=int, default=20, help="operations listed (default: 20)")
    cli.add_device_flag(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    time_key = "self_device_time_total" if cuda else "self_cpu_time_total"

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tempfile.TemporaryDirectory() as scratch, profile(activities=activities) as profiler:
        result = train(
            args.data, args.preset, Path(scratch), device=device.type, epochs=args.epochs, validate_every=args.epochs
        )
    events = profiler.key_averages()
    print(events.table(sort_by=time_key, row_limit=args.rows))

    batch_size = preset(args.preset).batch_size
    images = args.epochs * len_epoch(len(resolve(args.data).split("train")), batch_size) * batch_size
    busy_seconds = sum(getattr(event, time_key) for event in events) / 1e6
    print(f"{images} images trained; {busy_seconds:.1f} s of {device.type} time in the profiled operations")
    if result["images_per_second"]:
        per_image = busy_seconds / images
        print(
            f"{per_image * 1e6:.1f} us per image x {result['images_per_second']:.0f} img/s: "
            f"busy {per_image * result['images_per_second']:.0%} of the timed epochs"
        )


if __name__ == "__main__":
    main()
