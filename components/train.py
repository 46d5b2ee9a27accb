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

import collections
import copy
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm import tqdm

from components import checkpoints, cli
from components.atomic import write_json
from components.augment import Draws, augment, batch_draws, draw, epoch_batches, len_epoch, mix, on_device
from components.data import DataError, DataVersion, check_source, decode_split, from_input, resolve
from components.devices import describe_device, mixed_precision, pick_device
from components.evaluate import correct, predict
from components.init_weights import InitialWeights, initial_weights
from components.plots import curves_figure, image_grid_figure
from components.presets import PRESETS, ConfigError, TrainConfig, add_override_flags, overrides_from, preset
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
    Python, and replaying them as one graph is much faster (`benchmarks/step_breakdown.py`;
    benchmarks/RESULTS.md, "CUDA graphs")."""
    mode = ("reduce-overhead" if device.type == "cuda" else "off") if config.compile == "auto" else config.compile
    if mode not in COMPILE_MODES:
        raise ConfigError(f"--compile {config.compile!r}: choose auto or one of {', '.join(COMPILE_MODES)}")
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
    fine-tune (benchmarks/RESULTS.md, "Three training sizes")."""
    patch_size = _architecture(config)["patch_size"]
    example = ",".join(str(config.image_size * scale // 7 // patch_size * patch_size) for scale in (5, 7, 9))
    try:
        sizes = tuple(int(size) for size in config.train_sizes.split(",")) if config.train_sizes.strip() else ()
    except ValueError:
        raise ConfigError(
            f"--train-sizes {config.train_sizes!r}: give image sizes separated by commas, e.g. {example}"
        ) from None
    wrong = [size for size in sizes if size <= 0 or size % patch_size]
    if wrong:
        raise ConfigError(
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


class Splits(NamedTuple):
    """The training and validation images (N, H, W, 3) and labels, on the training device for the
    whole run: the augmentation runs there, resampling the training images to each training size."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    valid_images: torch.Tensor
    valid_labels: torch.Tensor


def decoded_splits(dataset: DataVersion, config: TrainConfig, device: torch.device) -> Splits:
    train_split = decode_split(dataset, "train", max(training_sizes(config)))
    valid_split = decode_split(dataset, "valid", config.image_size)
    return Splits(*(torch.from_numpy(array).to(device) for array in (*train_split, *valid_split)))


@dataclass
class TrainingState:
    """What a checkpoint holds and a resume restores: the settings, the classes and data version
    trained on, the model, its optimizer, the weight average (None without ``ema_decay``), the
    validation history, the best validated weights (``{"model", "epoch"}``) and the number of
    epochs trained. `to_checkpoint`, `saved` and `from_checkpoint` are the one place that knows
    the layout of ``checkpoints/best.pt`` and ``checkpoints/last.pt``."""

    BEST, LAST = "best.pt", "last.pt"

    config: TrainConfig
    classes: list[str]
    data_version: str
    model: ViT
    optimizer: torch.optim.Optimizer
    average: ViT | None
    history: dict = field(
        default_factory=lambda: {
            "epoch": [],
            "train_loss": [],
            "train_accuracy": [],
            "val_loss": [],
            "val_accuracy": [],
        }
    )
    best: dict = field(default_factory=dict)
    epoch: int = 0  # epochs trained: the next one to train, from 0

    @classmethod
    def start(
        cls,
        config: TrainConfig,
        classes: list[str],
        data_version: str,
        device: torch.device,
        initial: InitialWeights | None = None,
    ) -> TrainingState:
        """A fresh model, seeded by ``config.seed`` (with ``initial``'s weights over all but the head,
        which stays fresh for the data's classes), its AdamW and, with ``ema_decay``, its average."""
        torch.manual_seed(config.seed)
        model = build_model(config, len(classes))
        if initial is not None:
            model.load_state_dict({**model.state_dict(), **initial.state})
        model = model.to(device)
        optimizer = build_optimizer(model, config, device)
        average = copy.deepcopy(model).requires_grad_(False) if config.ema_decay else None
        return cls(config, classes, data_version, model, optimizer, average)

    @classmethod
    def saved(cls, folder: Path, config: TrainConfig) -> dict | None:
        """The last checkpoint in ``folder`` for ``--resume``, None (with a note) when there is
        none; refused when it was trained with other settings than ``config``."""
        path = folder / cls.LAST
        if not path.is_file():
            print(f"--resume: no checkpoint at {path}, starting from scratch")
            return None
        saved = checkpoints.load(path)
        if saved["train_config"] != asdict(config):
            raise ConfigError(
                f"--resume: {path} was trained with other settings; resume with the same preset and "
                f"overrides, or train into another --output. Saved: {saved['train_config']}"
            )
        return saved

    @classmethod
    def check_data(cls, saved: dict, dataset: DataVersion, folder: Path) -> None:
        """A resumed run must go on with the images it was trained on: other classes cannot load
        into its head, and other images of the same classes would silently make it another run."""
        trained_on = saved.get("data_version"), saved.get("classes")
        if trained_on != (dataset.version, dataset.classes):
            raise DataError(
                f"--resume: {folder / cls.LAST} was trained on data version {trained_on[0]} with the classes "
                f"{trained_on[1]}, --data is version {dataset.version} with {dataset.classes}; resume with the "
                f"data it was trained on, or train into a new --output"
            )

    @classmethod
    def from_checkpoint(
        cls, saved: dict, config: TrainConfig, classes: list[str], data_version: str, device: torch.device
    ) -> TrainingState:
        """The state as it was when the checkpoint `saved` read was written."""
        state = cls.start(config, classes, data_version, device)
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        if state.average is not None:
            state.average.load_state_dict(saved["average"])
        state.history, state.best, state.epoch = saved["history"], saved["best"], saved["epoch"] + 1
        return state

    @property
    def validated(self) -> ViT:
        """With an average of the weights, it is what is validated and kept as the best model."""
        return self.model if self.average is None else self.average

    def to_checkpoint(self) -> dict[str, dict]:
        """best.pt (the best validated weights, loadable by `checkpoints.load_model`) and last.pt
        (everything a resume needs), by file name."""
        described = {"config": self.model.config, "classes": self.classes}
        return {
            self.BEST: {**self.best, **described},
            self.LAST: {
                "model": self.model.state_dict(),
                **described,
                "optimizer": self.optimizer.state_dict(),
                "average": None if self.average is None else self.average.state_dict(),
                "epoch": self.epoch - 1,
                "history": self.history,
                "best": self.best,
                "train_config": asdict(self.config),
                "data_version": self.data_version,
            },
        }


class Loop:
    """The training loop's bookkeeping around a `TrainingState`: the step and the schedule's
    length, each epoch's summed loss and correct images (on the device), the numbers on their way
    back to the host, the progress bar, the stopwatch, the throughput's timing and the checkpoint
    writer into ``folder``."""

    def __init__(self, state: TrainingState, n_train: int, device: torch.device, tracker, folder: Path):
        self.config, self.device, self.tracker, self.folder = state.config, device, tracker, folder
        config = state.config
        self.steps_per_epoch = len_epoch(n_train, config.batch_size)
        self.total_steps, self.step = config.epochs * self.steps_per_epoch, state.epoch * self.steps_per_epoch
        self.first_epoch = self.unreported_from = state.epoch
        self.autocast = mixed_precision(device)
        self.progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        # Loss and correct predictions summed per epoch on the device, read with the validations.
        self.epoch_sums = torch.zeros(config.epochs, 2, device=device)
        self.step_losses, self.validations = DeviceScalars(device), DeviceScalars(device)
        self.window_start, self.window_images = time.perf_counter(), 0
        self.saved_at, self.timed_from = time.monotonic(), None
        self.stopwatch = Stopwatch()
        self.writer = checkpoints.CheckpointWriter()

    def after_step(self, state: TrainingState, loss: torch.Tensor, lr: float, n_images: int) -> None:
        """Counts the step, queues its loss every ``log_every`` steps and reports what has arrived."""
        self.step += 1
        self.window_images += n_images
        self.progress.update()
        if self.step % self.config.log_every == 0:
            elapsed = time.perf_counter() - self.window_start
            self.step_losses.push(loss, step=self.step, lr=lr, images_per_second=self.window_images / elapsed)
            self.window_start, self.window_images = time.perf_counter(), 0
        self.report_losses()
        self.record_validations(state)

    def report_losses(self, wait: bool = False) -> None:
        for value, logged in self.step_losses.arrived(wait=wait):
            report_step(self.tracker, self.progress, value, **logged)

    def record_validations(self, state: TrainingState, wait: bool = False) -> None:
        for measured, along in self.validations.arrived(wait=wait):
            line = record_validation(measured, history=state.history, best=state.best, tracker=self.tracker, **along)
            self.progress.write(line)

    def save(self, files: dict[str, dict]) -> None:
        self.writer.save({self.folder / name: payload for name, payload in files.items()})
        self.saved_at = time.monotonic()

    def start_timing_once(self) -> None:
        """Throughput is timed after the first epoch (compilation), from an idle GPU: the steps of
        that epoch still queued would otherwise count as timed."""
        if self.timed_from is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.timed_from = time.perf_counter()
            self.stopwatch.restart()

    def close(self) -> float | None:
        """Reports the losses still on their way, waits until the last checkpoints are on disk and
        returns the images/s since the first epoch (None when there was no later one)."""
        self.report_losses(wait=True)
        self.progress.close()
        config = self.config
        timed_epochs = config.epochs - self.first_epoch - 1
        throughput = (
            timed_epochs * self.steps_per_epoch * config.batch_size / (time.perf_counter() - self.timed_from)
            if (self.timed_from and timed_epochs > 0)
            else None
        )
        if throughput:
            shares = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.stopwatch.seconds.most_common())
            print(f"after the first epoch: {throughput:.0f} images/s; the loop's time went to {shares}")
        self.writer.wait()
        return throughput


def train_epoch(state: TrainingState, forward: Callable, splits: Splits, loop: Loop) -> None:
    """Trains epoch ``state.epoch`` on augmentations drawn for it, then counts it as trained."""
    config, epoch = state.config, state.epoch
    torch.manual_seed(config.seed * 10_007 + epoch)  # dropout, drop path, erasing, mixup: per epoch
    batches = epoch_batches(len(splits.train_images), config, epoch, loop.device)
    loop.stopwatch.lap("drawing the augmentation")
    state.model.train()  # a validation leaves it in eval mode
    for batch in batches:
        lr = learning_rate(config, loop.step, loop.total_steps, loop.steps_per_epoch)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        images, labels, targets = batch_inputs(
            splits.train_images, splits.train_labels, batch, config, len(state.classes)
        )
        loss, logits = optimization_step(forward, state.model, state.optimizer, images, targets, config, loop.autocast)
        if state.average is not None:
            update_average(state.average, state.model, config.ema_decay, loop.step)
        loop.epoch_sums[epoch, 0] += loss.detach()
        loop.epoch_sums[epoch, 1] += (logits.argmax(-1) == labels).sum()
        loop.after_step(state, loss, lr, len(labels))
        loop.stopwatch.lap("training steps")
    state.epoch += 1


def validate_and_checkpoint(state: TrainingState, splits: Splits, loop: Loop) -> None:
    """After every ``validate_every``-th epoch and the last: a validation of the validated weights,
    read back once it has arrived (on a GPU a few steps on: the host goes on queueing steps); when
    a checkpoint is due (the last epoch, or ``checkpoint_minutes`` since the previous one) every
    validation is waited for and best.pt and last.pt are written in the background."""
    config = state.config
    last_epoch = state.epoch == config.epochs
    if state.epoch % config.validate_every == 0 or last_epoch:
        trained_steps = (state.epoch - loop.unreported_from) * loop.steps_per_epoch
        trained_sums = loop.epoch_sums[loop.unreported_from : state.epoch]
        loop.validations.push(
            measure_validation(
                state.validated, splits.valid_images, splits.valid_labels, trained_sums, config.batch_size
            ),
            divisors=(1, len(splits.valid_labels), trained_steps, trained_steps * config.batch_size),
            epoch=state.epoch - 1,
            epochs=config.epochs,
            weights={k: v.detach().clone() for k, v in state.validated.state_dict().items()},
        )
        loop.unreported_from = state.epoch
        checkpoint_due = last_epoch or time.monotonic() - loop.saved_at >= config.checkpoint_minutes * 60
        loop.record_validations(state, wait=checkpoint_due)  # a checkpoint holds them all
        if checkpoint_due:
            loop.save(state.to_checkpoint())
    loop.stopwatch.lap("validation and checkpoints")


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
    throughput = loop.close()
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
    best_path = loop.folder / TrainingState.BEST
    model_id = tracker.model(best_path, f"vit {preset_name} best", state.model.config)
    tracker.artifact("history", history)
    return {
        "checkpoint": str(best_path),
        "last_checkpoint": str(loop.folder / TrainingState.LAST),
        "image_size": state.config.image_size,
        "epochs": history["epoch"],
        "train_loss": history["train_loss"],
        "val_accuracy": history["val_accuracy"],
        "val_loss": history["val_loss"],
        "images_per_second": throughput,
        "seconds_by_phase": dict(loop.stopwatch.seconds),
        "classes": state.classes,
        "data_version": state.data_version,
        "model_id": model_id,
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
    check_source(data)  # so does a --data that cannot be used
    folder = output / "checkpoints"
    saved = TrainingState.saved(folder, config) if resume else None

    with open_task("train", "training", output, title=f"train {preset_name}") as tracker:
        params = tracker.connect({"data": data, "preset": preset_name, **asdict(config)})
        config = TrainConfig(**{k: v for k, v in params.items() if k not in ("data", "preset")})
        architecture = {**_architecture(config), "image_size": config.image_size}
        initial = initial_weights(config.init, architecture) if config.init and saved is None else None
        dataset = resolve(params["data"])
        if saved is not None:
            TrainingState.check_data(saved, dataset, folder)
        splits = decoded_splits(dataset, config, device)
        if saved is None:
            state = TrainingState.start(config, dataset.classes, dataset.version, device, initial)
            if initial is not None:
                print(f"initial weights: {initial.description}")
            show_augmented_sample(tracker, splits, dataset.classes, config)
        else:
            state = TrainingState.from_checkpoint(saved, config, dataset.classes, dataset.version, device)
            print(f"resuming {folder / TrainingState.LAST} after epoch {state.epoch}")
        forward = compiled(state.model, config, device)
        loop = Loop(state, len(splits.train_images), device, tracker, folder)
        while state.epoch < config.epochs:
            train_epoch(state, forward, splits, loop)
            validate_and_checkpoint(state, splits, loop)
            loop.start_timing_once()
        result = finish(state, loop, tracker, output, preset_name)
    result["clearml"] = tracker.session
    write_json(result, output / "train.json")
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
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    parser.add_argument("--device", type=cli.device_name, default="auto", help="auto | cpu | cuda (default: auto)")
    add_override_flags(parser)
    args = parser.parse_args(argv)
    overrides = overrides_from(args)
    result = cli.run(parser, train, args.data, args.preset, args.output, args.resume, args.device, **overrides)
    print(f"best checkpoint {result['checkpoint']}: valid accuracy {max(result['val_accuracy']):.4f}")


if __name__ == "__main__":
    main()
