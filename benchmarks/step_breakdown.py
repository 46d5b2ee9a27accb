"""Where the training component's step time goes: the step of `components.train` built up
piece by piece on one model, in images/s and milliseconds a step.

Rows, each adding to the one before:

1. optimization step: forward (bf16 autocast and torch.compile on a GPU, in the mode that
   ``--compile`` picks: by default with CUDA graphs), the soft-target loss,
   backward, gradient clipping, AdamW, on one fixed augmented batch;
2. + augmentation: `batch_inputs` (augmentation on the device, label smoothing, mixup/cutmix)
   from draws already on the device;
3. + drawing: each epoch's draws drawn at its start and copied to the device, as the trainer
   does;

and two rows alone: the augmentation (`batch_inputs` from draws on the device) and the
drawing (epoch after epoch, per step). The model is compiled once; its first steps are untimed,
and the rows take turns, each the median of ``--repeats`` rounds.
Where row 1 is well below `train_throughput.py`'s model step, the difference is the training
configuration (drop path, clipping, the loss); where a row falls below the one before, what it
adds costs more host time than the device time it can hide behind.

    python benchmarks/step_breakdown.py --data fashion.zip                # vit-ti16-224's step
    python benchmarks/step_breakdown.py --data fashion.zip --rand-augment 0 --compile default
    python benchmarks/step_breakdown.py --data fashion.zip --preset smoke --steps 3   # CPU setting
"""

from __future__ import annotations

import argparse
import itertools

import torch
from train_throughput import round_robin_throughput  # beside this script

from components.common import cli
from components.common.augment import endless_batches, epoch_batches
from components.common.data import resolve
from components.common.devices import describe_device, mixed_precision, pick_device
from components.common.images import decode_split
from components.common.presets import add_override_flags, overrides_from, preset
from components.common.training import (
    batch_inputs,
    build_model,
    build_optimizer,
    compile_mode,
    compiled,
    optimization_step,
    step_sizes,
    training_sizes,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the archive whose train split is augmented")
    parser.add_argument("--preset", default="vit-ti16-224", help="training preset (default: vit-ti16-224)")
    cli.add_device_flag(parser)
    parser.add_argument("--steps", type=int, default=30, help="timed steps a round (default: 30)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median counts (default: 3)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    add_override_flags(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    config = preset(args.preset, **{"epochs": 1_000_000, **overrides_from(args)})
    dataset = resolve(args.data)
    n_classes = len(dataset.classes)
    train_images, train_labels = (
        torch.from_numpy(array).to(device) for array in decode_split(dataset, "train", max(training_sizes(config)))
    )

    torch.manual_seed(config.seed)
    model = build_model(config, n_classes).to(device).train()
    optimizer = build_optimizer(model, config, device)
    forward = compiled(model, config, device)
    autocast = mixed_precision(device)

    on_the_device = epoch_batches(len(train_images), config, 0, device)
    cycle = itertools.cycle(on_the_device)
    sizes = itertools.cycle(step_sizes(config, 0, len(on_the_device)))  # as training draws them
    fixed = batch_inputs(train_images, train_labels, on_the_device[0], config, n_classes, next(sizes))
    drawn = endless_batches(len(train_images), config, device)

    def fixed_batch() -> None:
        optimization_step(forward, model, optimizer, fixed[0], fixed[2], config, autocast)

    def augmented() -> None:
        images, _, targets = batch_inputs(train_images, train_labels, next(cycle), config, n_classes, next(sizes))
        optimization_step(forward, model, optimizer, images, targets, config, autocast)

    def drawing() -> None:
        images, _, targets = batch_inputs(train_images, train_labels, next(drawn), config, n_classes, next(sizes))
        optimization_step(forward, model, optimizer, images, targets, config, autocast)

    rows = {
        "1. optimization step, fixed batch": fixed_batch,
        "2. + augmentation (draws on the device)": augmented,
        "3. + drawing each epoch's draws": drawing,
        "augmentation alone": lambda: batch_inputs(
            train_images, train_labels, next(cycle), config, n_classes, next(sizes)
        ),
        "drawing alone": lambda: next(drawn),
    }
    name = describe_device(device)
    print(
        f"{args.preset} ({config.model}, batch {config.batch_size}, {config.image_size}x{config.image_size}, "
        f"RandAugment {config.rand_augment}, compile {compile_mode(config, device)}) on {name}, "
        f"torch {torch.__version__}"
    )
    speeds = round_robin_throughput(rows, config.batch_size, args.steps, args.warmup, args.repeats, device)
    for row, speed in speeds.items():
        print(f"{row:<42} {speed:10.1f} img/s {1000 * config.batch_size / speed:8.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
