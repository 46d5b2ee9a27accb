"""train: a ViT from a preset, trained from scratch, tracked in ClearML.

AdamW with linear warm-up and cosine decay, label smoothing, RandAugment, random erasing,
mixup/cutmix, gradient clipping; on a GPU bf16 autocast and torch.compile with CUDA graphs.
Images are decoded once and kept on the training device; each epoch's augmentation is drawn at
its start, seeded by (seed, epoch) so that a resumed run sees exactly the images an
uninterrupted one would, and `components.common.augment` applies the draws there, a batch at a time.
Only checkpoints make the host wait for the device (and, once, the start of the throughput's
timing): the losses it logs and the validations' results are read back once they have
arrived, so that a GPU always has steps queued.

    python -m components.train --data runs/data/<version> --preset smoke --output runs/train
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil
import torch

from components.common import checkpoints, cli, distributed
from components.common.atomic import write_json
from components.common.augment import augment, batch_draws, draw, epoch_batches, epoch_seed, on_device
from components.common.data import check_source, resolve
from components.common.devices import describe_device
from components.common.distributed import Ranks
from components.common.images import from_input
from components.common.init_weights import initial_weights
from components.common.loop import Loop, measure_validation
from components.common.plots import curves_figure, image_grid_figure
from components.common.presets import PRESETS, TrainConfig, add_override_flags, architecture, overrides_from, preset
from components.common.run_folder import claimed
from components.common.tracking import open_task
from components.common.training import (
    Splits,
    TrainingState,
    batch_inputs,
    compile_mode,
    compiled,
    decoded_splits,
    learning_rate,
    optimization_step,
    step_sizes,
    training_sizes,
    update_average,
)


def train_epoch(state: TrainingState, forward: Callable, splits: Splits, loop: Loop) -> None:
    """Trains epoch ``state.epoch`` on augmentations drawn for it (this rank's share of each
    batch), then counts it as trained."""
    config, epoch, ranks = state.config, state.epoch, loop.ranks
    torch.manual_seed(epoch_seed(config.seed, epoch, ranks.rank))  # dropout, drop path, mixing
    batches = epoch_batches(len(splits.train_images), config, epoch, loop.device, ranks.rank, ranks.world_size)
    sizes = step_sizes(config, epoch, len(batches))
    loop.stopwatch.lap("drawing the augmentation")
    state.model.train()  # a validation leaves it in eval mode
    for batch, size in zip(batches, sizes):
        lr = learning_rate(config, loop.step, loop.total_steps, loop.warmup_steps)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        images, labels, targets = batch_inputs(
            splits.train_images, splits.train_labels, batch, config, len(state.classes), size
        )
        loss, logits = optimization_step(forward, state.model, state.optimizer, images, targets, config, loop.autocast)
        if state.average is not None:
            update_average(state.average, state.model, config.ema_decay, loop.step)
        loop.epoch_sums[epoch, 0] += loss.detach()
        loop.epoch_sums[epoch, 1] += (logits.argmax(-1) == labels).sum()
        loop.after_step(state, loss, lr, len(labels) * ranks.world_size)
        loop.stopwatch.lap("training steps")
    state.epoch += 1


def validate_and_checkpoint(state: TrainingState, splits: Splits, loop: Loop) -> None:
    """After every ``validate_every``-th epoch and the last, a validation (`validate`); then a
    time budget's decision, which may end the schedule here (the epoch is then validated as the
    last); then, when due (the last epoch, or ``checkpoint_minutes`` since the previous one),
    every validation is waited for and best.pt and last.pt are written in the background
    (checkpoints follow validations)."""
    config = state.config
    if state.epoch % config.validate_every == 0 or state.epoch == state.epochs:
        validate(state, splits, loop)
    if loop.budget is not None:
        loop.budget.after_epoch(state, loop)
        if state.epoch == state.epochs and loop.unreported_from < state.epoch:
            validate(state, splits, loop)
    validated = loop.unreported_from == state.epoch  # a checkpoint holds every epoch's numbers
    if loop.ranks.writer and validated:
        checkpoint_due = time.monotonic() - loop.saved_at >= config.checkpoint_minutes * 60
        if state.epoch == state.epochs or checkpoint_due:
            loop.record_validations(state, wait=True)  # a checkpoint holds them all
            loop.save(state)
    loop.stopwatch.lap("validation and checkpoints")


def validate(state: TrainingState, splits: Splits, loop: Loop) -> None:
    """The epochs' training loss and correct images since the previous validation gathered from
    the ranks, and on rank 0 a validation of the validated weights, read back once it has
    arrived (on a GPU a few steps on: the host goes on queueing steps)."""
    ranks = loop.ranks
    trained_steps = (state.epoch - loop.unreported_from) * loop.steps_per_epoch
    sums = loop.epoch_sums[loop.unreported_from : state.epoch]  # this rank's: mean losses, correct images
    trained_sums = torch.stack([ranks.averaged(sums[:, 0]), ranks.summed(sums[:, 1])], dim=1)
    loop.unreported_from = state.epoch
    if not ranks.writer:  # rank 0 validates: the model is the same on every rank
        return
    loop.validations.push(
        measure_validation(
            state.validated, splits.valid_images, splits.valid_labels, trained_sums, state.config.batch_size
        ),
        divisors=(1, len(splits.valid_labels), trained_steps, trained_steps * state.config.batch_size),
        epoch=state.epoch - 1,
        epochs=state.epochs,
        weights={k: v.detach().clone() for k, v in state.validated.state_dict().items()},
    )
    loop.record_validations(state)


def show_augmented_sample(tracker, splits: Splits, classes: list[str], config: TrainConfig) -> None:
    """Reports the first images of epoch 0 as training will see them, before mixing."""
    shown = np.arange(min(16, len(splits.train_images)))
    draws = batch_draws(draw(len(splits.train_images), config, 0), shown)
    sample = on_device([draws], splits.train_images.device)[0]
    sample_images = from_input(augment(splits.train_images, sample, size=config.image_size))
    sample_classes = [classes[i] for i in splits.train_labels[sample.index].tolist()]
    tracker.figure("augmented training images", image_grid_figure(sample_images, sample_classes))


def finish(state: TrainingState, loop: Loop, tracker, output: Path, preset_name: str) -> dict:
    """Once the loop is done: the throughput, the training curves, the best model registered and
    the history as an artifact; returns `train`'s result."""
    throughput = loop.close(state.epoch)
    history = state.history
    config = state.config
    figure = curves_figure(
        {
            "cross-entropy loss": {"train": history["train_loss"], "valid": history["val_loss"]},
            "validation accuracy (fraction correct)": {"valid": history["val_accuracy"]},
        },
        "epoch",
        f"training {config.model} at {config.image_size} px, preset {preset_name}",
        x=history["epoch"],
    )
    figure.savefig(output / "curves.png", dpi=120)
    tracker.figure("training curves", figure)
    best_path = loop.folder / checkpoints.BEST
    registered = tracker.model(best_path, f"vit {preset_name} best", state.model.config)
    tracker.artifact("history", history)
    return {
        "checkpoint": str(best_path),
        "last_checkpoint": str(loop.folder / checkpoints.LAST),
        "image_size": state.config.image_size,
        "epochs": history["epoch"],
        "train_loss": history["train_loss"],
        "val_accuracy": history["val_accuracy"],
        "val_loss": history["val_loss"],
        "images_per_second": throughput,
        "time_budget": state.budget or None,
        "world_size": loop.ranks.world_size,
        "seconds_by_phase": dict(loop.stopwatch.seconds),
        "classes": state.classes,
        "data_version": state.data_version,
        "model": registered or str(best_path),
        "config": asdict(config),
        "device": describe_device(loop.device),
        "versions": {"torch": torch.__version__, "clearml": metadata.version("clearml")},
        "plots": [
            {
                "path": str(output / "curves.png"),
                "caption": "Training curves, one point per validation. Left: the training loss (mean over "
                "the epoch's augmented batches, with label smoothing, so it stays above zero) and the "
                "validation loss; right: the share of validation images classified correctly. Both losses "
                "falling means the model learns; a validation loss rising while the training loss falls "
                "means it overfits.",
            }
        ],
    }


def train(
    data: str,
    preset_name: str,
    output: Path,
    resume: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    ranks_per_node: int = 1,
    node: dict | None = None,
    started: float | None = None,
    **overrides,
) -> dict | None:
    """Trains into ``output`` (refused while another run writes there, and where an earlier run
    left its checkpoints, unless ``resume`` continues it or ``overwrite`` replaces it) and
    returns ``{"checkpoint" (best.pt), "last_checkpoint", "image_size", "epochs" (those that
    ended in a validation), "train_loss" (mean since the previous validation), "val_accuracy",
    "val_loss" (one per validation), "images_per_second" (the whole job's, from the end of the
    first epoch to the end of the last, the device idle at both), "time_budget" (what a
    ``time_budget`` decided: `TrainingState`'s ``budget``, else None), "world_size" (ranks),
    "seconds_by_phase" (of the loop, after the first epoch; checkpoints count until their tensors
    are on the host, the files are written meanwhile), "classes", "data_version", "model" (what
    the next steps load: with a server the registered model's id, else the checkpoint),
    "config", "device", "versions" (torch, clearml), "plots" ({"path", "caption"}),
    "clearml"}``; also written to ``output/train.json``.

    Data-parallel under ``torchrun`` (each process a rank; rank 0 returns the result, the others
    None), or with ``ranks_per_node`` > 1 or a ``node`` of a multi-machine job, whose ranks it
    starts itself (`components.common.distributed.launch`). A time budget counts from ``started``
    (a `time.time()`; default: now)."""
    config = preset(preset_name, **overrides)
    started = time.time() if started is None else started
    if ranks_per_node > 1 or node:
        distributed.check_launch(config.batch_size, ranks_per_node, node)  # here, before any rank starts
        arguments = dict(data=data, preset_name=preset_name, output=output, resume=resume, device=device)
        arguments.update(overwrite=overwrite, started=started, **overrides)
        return distributed.launch(train, arguments, ranks_per_node, node)
    output = Path(output)
    with distributed.joined(device) as (ranks, device):
        distributed.check_batch(config.batch_size, ranks.world_size)
        compile_mode(config, device)  # a wrong --compile or --train-sizes fails before any work
        if config.image_size not in training_sizes(config):  # e.g. --image-size changed, the preset's sizes kept
            print(
                f"note: training at {config.train_sizes} for a model of size {config.image_size}; "
                f"--train-sizes {config.image_size} trains at that size alone"
            )
        earlier = None if resume else output / "checkpoints" / checkpoints.LAST
        advice = "pass --resume to continue it, --overwrite to train anew in its place, or another --output"
        outputs = ("checkpoints", "train.json")
        with claimed(output, earlier, overwrite, advice, outputs) if ranks.writer else nullcontext():
            result = run_training(data, preset_name, config, output, resume, device, ranks, started)
            if ranks.writer:
                write_json(result, output / "train.json")
    return result


def run_training(
    data: str,
    preset_name: str,
    config: TrainConfig,
    output: Path,
    resume: bool,
    device,
    ranks: Ranks,
    started: float,
) -> dict | None:
    """`train` in the folder it holds: the task, the state (fresh or resumed), the epochs. Rank 0
    opens the task and returns the result; the other ranks take its settings and train."""
    folder = output / "checkpoints"
    saved = TrainingState.saved(folder, config) if resume else None
    task = open_task("train", "training", output, title=f"train {preset_name}") if ranks.writer else nullcontext()
    with task as tracker:
        settings = {"data": data, "preset": preset_name, **asdict(config)}
        params = ranks.broadcast(tracker.connect(settings) if tracker else None)  # edited in the web UI, maybe
        config = TrainConfig(**{k: v for k, v in params.items() if k not in ("data", "preset")})
        model_shape = {**architecture(config), "image_size": config.image_size}
        with ranks.writer_first():  # one download of the weights, one extraction of the data
            initial = initial_weights(config.init, model_shape) if config.init and saved is None else None
            dataset = resolve(params["data"])
        if saved is not None:
            TrainingState.check_data(saved, dataset, folder)
        splits = decoded_splits(dataset, config, device)
        if saved is None:
            state = TrainingState.start(config, dataset.classes, dataset.version, device, initial)
            if initial is not None:
                print(f"initial weights: {initial.description}")
            if tracker:
                show_augmented_sample(tracker, splits, dataset.classes, config)
        else:
            state = TrainingState.from_checkpoint(saved, config, dataset.classes, dataset.version, device)
            fitted = f", of the {state.epochs} its time budget fitted" if state.budget else ""
            print(f"resuming {folder / checkpoints.LAST} after epoch {state.epoch}{fitted}")
        forward = compiled(distributed.parallel(state.model, ranks, device), config, device)
        loop = Loop(state, len(splits.train_images), device, tracker, folder, ranks, started)
        while state.epoch < state.epochs:
            train_epoch(state, forward, splits, loop)
            validate_and_checkpoint(state, splits, loop)
            loop.start_timing_once()
        if not ranks.writer:
            return None
        result = finish(state, loop, tracker, output, preset_name)
    result["clearml"] = tracker.session
    return result


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("train", __doc__)
    parser.add_argument(
        "--data",
        required=True,
        help="a zip, a folder in the headgear layout, a data version "
        "folder written by fetch_data, or (with a server) a ClearML Dataset id",
    )
    parser.add_argument("--preset", default="smoke", choices=list(PRESETS), help="training preset (default: smoke)")
    parser.add_argument(
        "--output", type=cli.output_folder, required=True, help="folder for checkpoints/, train.json, curves.png"
    )
    earlier_run = parser.add_mutually_exclusive_group()
    earlier_run.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    earlier_run.add_argument(
        "--overwrite", action="store_true", help="train anew where an earlier run left its checkpoints"
    )
    cli.add_device_flag(parser)
    parser.add_argument(
        "--ranks",
        type=cli.positive_int,
        default=1,
        help="data-parallel processes to start on this machine, a GPU each (on a CPU, a share of its cores), "
        "as torchrun --nproc_per_node would; --batch-size stays the global batch (default: 1)",
    )
    add_override_flags(parser)
    args = parser.parse_args(argv)
    parser.prog = distributed.from_environment().name  # under torchrun, whose rank speaks
    overrides = overrides_from(args)
    cli.run(parser, preset, args.preset, **overrides)  # a wrong setting is named even when the data is wrong too
    cli.run(parser, check_source, args.data)
    where = (args.output, args.resume, args.device, args.overwrite, args.ranks)
    started = psutil.Process().create_time()  # a time budget is the command's, from its start
    result = cli.run(parser, train, args.data, args.preset, *where, started=started, **overrides)
    if result is not None:  # rank 0's
        print(f"best checkpoint {result['checkpoint']}: valid accuracy {max(result['val_accuracy']):.4f}")


if __name__ == "__main__":
    main()
