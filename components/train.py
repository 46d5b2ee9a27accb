"""train: a ViT from a preset, trained from scratch, tracked in ClearML.

AdamW with linear warm-up and cosine decay, label smoothing, RandAugment, random erasing,
mixup/cutmix, gradient clipping; on a GPU bf16 autocast and torch.compile with CUDA graphs.
Images are decoded once and kept on the training device; each epoch's augmentation is drawn at
its start, seeded by (seed, epoch) so that a resumed run sees exactly the images an
uninterrupted one would, and `components.augment` applies the draws there, a batch at a time.
Only checkpoints make the host wait for the device (and, once, the start of the throughput's
timing): the losses it logs and the validations' results are read back once they have
arrived, so that a GPU always has steps queued.

    python -m components.train --data runs/data/<version> --preset smoke --output runs/train
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm import tqdm

from components import checkpoints
from components.atomic import write_json
from components.augment import Draws, augment, batch_draws, draw, epoch_batches, len_epoch, mix, on_device
from components.data import DataError, decode_split, from_input, resolve
from components.devices import pick_device
from components.evaluate import correct, predict
from components.plots import curves_figure, image_grid_figure
from components.presets import TrainConfig, add_override_flags, overrides_from, preset
from components.tracking import open_task
from model import ViT, model_config


def batch_inputs(
    train_images: torch.Tensor, train_labels: torch.Tensor, draws: Draws, config: TrainConfig, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch: its augmented (and mixed) input images (B, 3, s, s) at a size s drawn
    from `training_sizes`, labels (B,) and soft targets (B, K) (label smoothing, then
    mixup/cutmix)."""
    compiled_warp = compile_mode(config, train_images.device) != "off"
    sizes = training_sizes(config)
    size = sizes[int(torch.randint(len(sizes), ()))] if len(sizes) > 1 else sizes[0]
    images = augment(train_images, draws, compiled_warp, size)
    labels = train_labels.index_select(0, draws.index)
    targets = F.one_hot(labels, n_classes).float()
    targets = targets * (1 - config.label_smoothing) + config.label_smoothing / n_classes
    images, targets = mix(images, targets, config)
    return images, labels, targets


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(config: TrainConfig, device: torch.device) -> str:
    """``config.compile``, with ``auto`` resolved: torch.compile with CUDA graphs on a GPU, eager
    on a CPU. CUDA graphs because at these model sizes the host, not the GPU, sets the pace: a
    compiled ViT-Ti step still launches some hundred kernels and library calls one by one from
    Python (23.6 ms a step on an H100), and replaying them as one graph cuts the step to 14.6 ms
    (`benchmarks/step_breakdown.py`, benchmarks/RESULTS.md)."""
    mode = ("reduce-overhead" if device.type == "cuda" else "off") if config.compile == "auto" else config.compile
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile {config.compile!r}: choose auto or one of {', '.join(COMPILE_MODES)}")
    return mode


def compiled(model: ViT, config: TrainConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as the training step calls it: itself, or torch.compile'd in `compile_mode`."""
    mode = compile_mode(config, device)
    # Static shapes, one graph per training size: with dynamic ones (torch's default after a
    # second size) the backward of the interpolated position embeddings fails to trace.
    return model if mode == "off" else torch.compile(model, mode=mode, dynamic=False)


def optimization_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    model: ViT,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    autocast: torch.autocast,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (``forward`` is the model, maybe compiled) under ``autocast``, soft-target
    cross-entropy, backward, gradient clipping, the optimizer's step; returns (loss, logits)."""
    torch.compiler.cudagraph_mark_step_begin()  # with CUDA graphs: the last step's outputs are done with
    with autocast:
        logits = forward(images, interpolate_pos_embed=True)  # images may be of another training size
    loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return loss, logits


class DeviceScalars:
    """Numbers computed on the device, read on the host without making it wait: `push` starts a
    copy to pinned memory behind an event, and `arrived` yields the values whose copies are done
    (a float, or a list for a tensor of several, with what was pushed along), a few steps later.
    Reading a loss with ``.item()`` instead would stall the host until the device caught up,
    and with it the queue of work ahead."""

    def __init__(self, device: torch.device):
        self.device, self.pending = device, collections.deque()

    def push(self, value: torch.Tensor, **along) -> None:
        if self.device.type != "cuda":
            self.pending.append((value.detach().cpu(), None, along))
            return
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value.detach(), non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.pending.append((host, copied, along))

    def arrived(self, wait: bool = False) -> Iterator[tuple[float | list[float], dict]]:
        while self.pending and (wait or self.pending[0][1] is None or self.pending[0][1].query()):
            host, copied, along = self.pending.popleft()
            if copied is not None:
                copied.synchronize()
            yield host.tolist(), along


class Stopwatch:
    """Host seconds by phase of the training loop: ``lap(phase)`` adds the time since the
    previous lap to ``phase``. On a GPU a step's time is what the host spent issuing it, which
    includes waiting whenever the device is behind."""

    def __init__(self):
        self.seconds, self.last = collections.Counter(), time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now

    def restart(self) -> None:
        self.seconds.clear()
        self.last = time.perf_counter()


def report_step(tracker, progress: tqdm, loss: float, step: int, lr: float, images_per_second: float) -> None:
    tracker.scalar("loss", "train (step)", loss, step)
    tracker.scalar("learning rate", "lr", lr, step)
    tracker.scalar("throughput", "images/s", images_per_second, step)
    progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}")


def measure_validation(
    validated: ViT, valid_images: torch.Tensor, valid_labels: torch.Tensor, epoch_sums: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """(4,) on the device, nothing read back: the validation loss of ``validated`` and its number
    of correct images, then the training loss and correct images summed over ``epoch_sums``
    (epochs, 2). `record_validation` divides them once they have arrived on the host."""
    logits = predict(validated, valid_images, valid_labels.device, batch_size, to_host=False)
    validation = torch.stack([F.cross_entropy(logits, valid_labels), correct(logits, valid_labels).sum()])
    return torch.cat([validation, epoch_sums.sum(0)])


def record_validation(
    measured: list[float],
    divisors: tuple[int, ...],
    epoch: int,
    epochs: int,
    weights: dict,
    history: dict,
    best: dict,
    tracker,
) -> str:
    """Adds the validation after ``epoch`` (from 0), `measure_validation`'s numbers over
    ``divisors``, to ``history`` and the tracker; ``weights``, the validated ones, become
    ``best`` when no earlier validation was as accurate. Returns the line to print."""
    val_loss, val_accuracy, train_loss, train_accuracy = (value / n for value, n in zip(measured, divisors))
    if val_accuracy > max(history["val_accuracy"], default=-1.0):  # written with the next checkpoint
        best.update(model=weights, epoch=epoch)
    for name, value in zip(
        ("train_loss", "train_accuracy", "val_loss", "val_accuracy"),
        (train_loss, train_accuracy, val_loss, val_accuracy),
    ):
        history[name].append(value)
        tracker.scalar(name.split("_")[1], "valid" if name.startswith("val") else "train", value, epoch + 1)
    history["epoch"].append(epoch + 1)
    return (
        f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, valid loss {val_loss:.4f}, "
        f"valid accuracy {val_accuracy:.4f}"
    )


def learning_rate(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr``."""
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(config: TrainConfig, n_classes: int) -> ViT:
    return ViT(
        **_architecture(config),
        image_size=config.image_size,
        n_classes=n_classes,
        attention=config.attention,
        dropout_rate=config.dropout_rate,
        drop_path_rate=config.drop_path_rate,
    )


def _architecture(config: TrainConfig) -> dict:
    return model_config(config.model, **({"patch_size": config.patch_size} if config.patch_size else {}))


@functools.cache  # asked every step; a TrainConfig is frozen, so its sizes are too
def training_sizes(config: TrainConfig) -> tuple[int, ...]:
    """The image sizes a training step draws from: ``config.train_sizes`` ("160,224,288"), or
    ``image_size`` alone when it is empty. Training at sizes around the model's own, with the
    position embeddings interpolated to each, is what keeps a model accurate at 384 without a
    fine-tune (on the CPU proxy of benchmarks/RESULTS.md: 0.4 points lost and 2.0 gained on two
    seeds, where the same model trained at one size lost 4.2 and 3.0)."""
    patch_size = _architecture(config)["patch_size"]
    example = ",".join(str(config.image_size * scale // 7 // patch_size * patch_size) for scale in (5, 7, 9))
    try:
        sizes = tuple(int(size) for size in config.train_sizes.split(",")) if config.train_sizes.strip() else ()
    except ValueError:
        raise ValueError(
            f"--train-sizes {config.train_sizes!r}: give image sizes separated by commas, e.g. {example}"
        ) from None
    wrong = [size for size in sizes if size <= 0 or size % patch_size]
    if wrong:
        raise ValueError(
            f"--train-sizes {config.train_sizes!r}: {', '.join(map(str, wrong))} is not a positive multiple of "
            f"the patch size {patch_size}; e.g. {example}"
        )
    return sizes or (config.image_size,)


def build_optimizer(model: ViT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, the class token and position embeddings."""
    decay = [p for p in model.parameters() if p.ndim >= 2 and p is not model.projector.pos_embed]
    no_decay = [p for p in model.parameters() if p.ndim < 2 or p is model.projector.pos_embed]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")


@torch.no_grad()
def update_average(average: ViT, model: ViT, decay: float, step: int) -> None:
    """Exponential moving average of the weights: average <- d average + (1 - d) model, with
    d = min(decay, (1 + step) / (10 + step)) so that the first weights do not linger (as timm
    warms it up). On the device, without a host-device synchronisation."""
    warmed_up = min(decay, (1 + step) / (10 + step))
    get_ema_multi_avg_fn(warmed_up)(list(average.parameters()), list(model.parameters()), None)


def train(data: str, preset_name: str, output: Path, resume: bool = False, device: str = "auto", **overrides) -> dict:
    """Trains and returns ``{"checkpoint" (best.pt), "last_checkpoint", "image_size", "epochs"
    (those that ended in a validation), "train_loss" (mean since the previous validation),
    "val_accuracy", "val_loss" (one per validation), "images_per_second" (from the end of the
    first epoch to the end of the last, the device idle at both) and "seconds_by_phase" (of the
    loop, after the first epoch; checkpoints count until their tensors are on the host, the
    files are written meanwhile), "classes", "data_version", "model_id" (with a server),
    "config", "device", "versions" (torch, clearml), "plots" ({"path", "caption"}), "clearml"}``;
    also written to ``output/train.json``."""
    output = Path(output)
    config = preset(preset_name, **overrides)
    device = pick_device(device)
    compile_mode(config, device)  # a wrong --compile or --train-sizes fails before any work
    if config.image_size not in training_sizes(config):  # e.g. --image-size changed, the preset's sizes kept
        print(
            f"note: training at {config.train_sizes} for a model of size {config.image_size}; "
            f"--train-sizes {config.image_size} trains at that size alone"
        )
    last_path, best_path = output / "checkpoints" / "last.pt", output / "checkpoints" / "best.pt"
    state = checkpoints.load(last_path) if resume and last_path.is_file() else None
    if resume and state is None:
        print(f"--resume: no checkpoint at {last_path}, starting from scratch")
    if state is not None and state["train_config"] != asdict(config):
        raise ValueError(
            f"--resume: {last_path} was trained with other settings; resume with the same preset and "
            f"overrides, or train into another --output. Saved: {state['train_config']}"
        )

    with open_task("train", "training", output, title=f"train {preset_name}") as tracker:
        params = tracker.connect({"data": data, "preset": preset_name, **asdict(config)})
        config = TrainConfig(**{k: v for k, v in params.items() if k not in ("data", "preset")})
        dataset = resolve(params["data"])
        classes = dataset.classes
        train_images, train_labels = (
            torch.from_numpy(array).to(device) for array in decode_split(dataset, "train", max(training_sizes(config)))
        )  # on the device for the whole run: its augmentation runs there, resampling to each training size
        valid_images, valid_labels = decode_split(dataset, "valid", config.image_size)

        torch.manual_seed(config.seed)
        model = build_model(config, len(classes)).to(device)
        optimizer = build_optimizer(model, config, device)
        # With an average of the weights, it is what is validated and kept as the best model.
        average = copy.deepcopy(model).requires_grad_(False) if config.ema_decay else None
        validated = model if average is None else average
        history = {"epoch": [], "train_loss": [], "train_accuracy": [], "val_loss": [], "val_accuracy": []}
        first_epoch, best = 0, {}
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if average is not None:
                average.load_state_dict(state["average"])
            history, first_epoch, best = state["history"], state["epoch"] + 1, state["best"]
            print(f"resuming {last_path} after epoch {first_epoch}")
        forward = compiled(model, config, device)

        if first_epoch == 0:
            shown = np.arange(min(16, len(train_images)))
            sample = on_device([batch_draws(draw(len(train_images), config, 0), shown)], device)[0]
            sample_images = from_input(augment(train_images, sample, size=config.image_size))
            sample_classes = [classes[i] for i in train_labels[sample.index].tolist()]
            tracker.figure("augmented training images", image_grid_figure(sample_images, sample_classes))

        valid_images, valid_labels = (torch.from_numpy(array).to(device) for array in (valid_images, valid_labels))
        steps_per_epoch = len_epoch(len(train_images), config.batch_size)
        total_steps, step = config.epochs * steps_per_epoch, first_epoch * steps_per_epoch
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
        # Loss and correct predictions summed per epoch on the device, read with the validations.
        epoch_sums = torch.zeros(config.epochs, 2, device=device)
        step_losses, validations = DeviceScalars(device), DeviceScalars(device)
        unreported_from = first_epoch
        window_start, window_images = time.perf_counter(), 0
        saved_at, timed_from = time.monotonic(), None
        stopwatch = Stopwatch()
        writer = checkpoints.CheckpointWriter()
        model.train()
        for epoch in range(first_epoch, config.epochs):
            torch.manual_seed(config.seed * 10_007 + epoch)  # dropout, drop path, erasing, mixup: per epoch
            batches = epoch_batches(len(train_images), config, epoch, device)
            stopwatch.lap("drawing the augmentation")
            for batch in batches:
                lr = learning_rate(config, step, total_steps, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images, labels, targets = batch_inputs(train_images, train_labels, batch, config, len(classes))
                loss, logits = optimization_step(forward, model, optimizer, images, targets, config, autocast)
                if average is not None:
                    update_average(average, model, config.ema_decay, step)
                epoch_sums[epoch, 0] += loss.detach()
                epoch_sums[epoch, 1] += (logits.argmax(-1) == labels).sum()
                step += 1
                window_images += len(labels)
                progress.update()
                if step % config.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    step_losses.push(loss, step=step, lr=lr, images_per_second=window_images / elapsed)
                    window_start, window_images = time.perf_counter(), 0
                for value, logged in step_losses.arrived():
                    report_step(tracker, progress, value, **logged)
                for measured, along in validations.arrived():
                    progress.write(record_validation(measured, history=history, best=best, tracker=tracker, **along))
                stopwatch.lap("training steps")

            last_epoch = epoch + 1 == config.epochs
            if (epoch + 1) % config.validate_every == 0 or last_epoch:
                # Read back once it has arrived, on a GPU a few steps on: the host goes on queueing steps.
                trained_steps = (epoch + 1 - unreported_from) * steps_per_epoch
                trained_sums = epoch_sums[unreported_from : epoch + 1]
                validations.push(
                    measure_validation(validated, valid_images, valid_labels, trained_sums, config.batch_size),
                    divisors=(1, len(valid_labels), trained_steps, trained_steps * config.batch_size),
                    epoch=epoch,
                    epochs=config.epochs,
                    weights={k: v.detach().clone() for k, v in validated.state_dict().items()},
                )
                model.train()
                unreported_from = epoch + 1
                checkpoint_due = last_epoch or time.monotonic() - saved_at >= config.checkpoint_minutes * 60
                for measured, along in validations.arrived(wait=checkpoint_due):  # a checkpoint holds them all
                    progress.write(record_validation(measured, history=history, best=best, tracker=tracker, **along))
                if checkpoint_due:
                    writer.save(
                        {
                            best_path: {**best, "config": model.config, "classes": classes},
                            last_path: {
                                "model": model.state_dict(),
                                "config": model.config,
                                "classes": classes,
                                "optimizer": optimizer.state_dict(),
                                "average": None if average is None else average.state_dict(),
                                "epoch": epoch,
                                "history": history,
                                "best": best,
                                "train_config": asdict(config),
                                "data_version": dataset.version,
                            },
                        }
                    )
                    saved_at = time.monotonic()
            stopwatch.lap("validation and checkpoints")
            if epoch == first_epoch:
                # Throughput is timed after the first epoch (compilation), from an idle GPU: the
                # steps of that epoch still queued would otherwise count as timed.
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timed_from = time.perf_counter()
                stopwatch.restart()
        for value, logged in step_losses.arrived(wait=True):
            report_step(tracker, progress, value, **logged)
        progress.close()
        timed_epochs = config.epochs - first_epoch - 1
        throughput = (
            timed_epochs * steps_per_epoch * config.batch_size / (time.perf_counter() - timed_from)
            if (timed_from and timed_epochs > 0)
            else None
        )
        if throughput:
            shares = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in stopwatch.seconds.most_common())
            print(f"after the first epoch: {throughput:.0f} images/s; the loop's time went to {shares}")
        writer.wait()  # the last checkpoints are on disk

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
        model_id = tracker.model(best_path, f"vit {preset_name} best", model.config)
        tracker.artifact("history", history)
        result = {
            "checkpoint": str(best_path),
            "last_checkpoint": str(last_path),
            "image_size": config.image_size,
            "epochs": history["epoch"],
            "train_loss": history["train_loss"],
            "val_accuracy": history["val_accuracy"],
            "val_loss": history["val_loss"],
            "images_per_second": throughput,
            "seconds_by_phase": dict(stopwatch.seconds),
            "classes": classes,
            "data_version": dataset.version,
            "model_id": model_id,
            "config": asdict(config),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
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
    result["clearml"] = tracker.session
    write_json(result, output / "train.json")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        required=True,
        help="a zip, a folder in the headgear layout, a data version "
        "folder written by fetch_data, or (with a server) a ClearML Dataset id",
    )
    parser.add_argument("--preset", default="smoke", help="smoke | cpu-10min | vit-ti16-224 (default: smoke)")
    parser.add_argument("--output", type=Path, required=True, help="folder for checkpoints/, train.json, curves.png")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    add_override_flags(parser)
    args = parser.parse_args(argv)
    try:
        result = train(
            args.data, args.preset, args.output, resume=args.resume, device=args.device, **overrides_from(args)
        )
    except (DataError, ValueError, FileNotFoundError) as error:
        parser.exit(2, f"train: error: {error}\n")
    print(f"best checkpoint {result['checkpoint']}: valid accuracy {max(result['val_accuracy']):.4f}")


if __name__ == "__main__":
    main()
