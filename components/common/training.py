"""What a training run is made of, shared by `components.train` and the fine-tune of
`components.highres`: the model built from the settings, the schedule, the optimizer and its
step, the weight average, the batches, and the state a checkpoint holds."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import get_ema_multi_avg_fn

from components.common import checkpoints
from components.common.augment import Draws, augment, epoch_seed, mix
from components.common.data import DataVersion
from components.common.errors import ConfigError, DataError
from components.common.images import decode_split
from components.common.init_weights import InitialWeights
from components.common.presets import TrainConfig, architecture
from model import ViT


def batch_inputs(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    draws: Draws,
    config: TrainConfig,
    n_classes: int,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch: its augmented (and mixed) input images (B, 3, size, size), labels (B,)
    and soft targets (B, K) (label smoothing, then mixup/cutmix)."""
    compiled_warp = compile_mode(config, train_images.device) != "off"
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


def learning_rate(config: TrainConfig, step: int, total_steps: int, warmup_steps: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(config: TrainConfig, n_classes: int) -> ViT:
    return ViT(
        **architecture(config),
        image_size=config.image_size,
        n_classes=n_classes,
        attention=config.attention,
        dropout_rate=config.dropout_rate,
        drop_path_rate=config.drop_path_rate,
    )


@functools.cache  # asked every step; a TrainConfig is frozen, so its sizes are too
def training_sizes(config: TrainConfig) -> tuple[int, ...]:
    """The image sizes a training step draws from: ``config.train_sizes`` ("160,224,288"), or
    ``image_size`` alone when it is empty. Training at sizes around the model's own, with the
    position embeddings interpolated to each, is what keeps a model accurate at 384 without a
    fine-tune (benchmarks/RESULTS.md, "Three training sizes")."""
    patch_size = architecture(config)["patch_size"]
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


def step_sizes(config: TrainConfig, epoch: int, steps: int) -> list[int]:
    """The image size of each of an epoch's ``steps``, drawn from `training_sizes` by (seed,
    epoch) alone: every rank of a data-parallel job trains a step at the same size."""
    sizes = training_sizes(config)
    drawn = np.random.default_rng([epoch_seed(config.seed, epoch), len(sizes)]).integers(len(sizes), size=steps)
    return [sizes[i] for i in drawn]


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
    validation history, the best validated weights (``{"model", "epoch"}``), the number of
    epochs trained and, with a time budget, what it decided (``{"seconds", "epochs" (the
    schedule's length), "fitted" (the epochs it first fitted), "first_epoch_seconds",
    "stopped_early"}``): `to_checkpoint` writes it into `checkpoints.payload`s, `saved` and
    `from_checkpoint` read it back."""

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
    budget: dict = field(default_factory=dict)  # empty without a time budget, or before it decided

    @property
    def epochs(self) -> int:
        """The schedule's length: the epochs a time budget fitted, else ``config.epochs``."""
        return self.budget.get("epochs", self.config.epochs)

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
        path = folder / checkpoints.LAST
        if not path.is_file():
            print(f"--resume: no checkpoint at {path}, starting from scratch")
            return None
        advice = "a damaged last.pt has best.pt beside it: --init it into a new --output, or --overwrite to start over"
        saved = checkpoints.load(path, advice)
        saved["train_config"] = {**asdict(TrainConfig()), **saved["train_config"]}  # later settings: defaults
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
                f"--resume: {folder / checkpoints.LAST} was trained on data version {trained_on[0]} with the classes "
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
        state.budget = saved.get("budget", {})
        return state

    @property
    def validated(self) -> ViT:
        """With an average of the weights, it is what is validated and kept as the best model."""
        return self.model if self.average is None else self.average

    def to_checkpoint(self) -> dict[str, dict]:
        """best.pt (the best validated weights, loadable by `checkpoints.load_model`) and last.pt
        (everything a resume needs), by file name."""
        config, classes = self.model.config, self.classes
        return {
            checkpoints.BEST: checkpoints.payload(self.best["model"], config, classes, epoch=self.best["epoch"]),
            checkpoints.LAST: checkpoints.payload(
                self.model.state_dict(),
                config,
                classes,
                optimizer=self.optimizer.state_dict(),
                average=None if self.average is None else self.average.state_dict(),
                epoch=self.epoch - 1,
                history=self.history,
                best=self.best,
                budget=self.budget,
                train_config=asdict(self.config),
                data_version=self.data_version,
            ),
        }
