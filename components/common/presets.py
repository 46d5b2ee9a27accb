"""Training presets: named, complete configurations (`TrainConfig`), each setting with the help
text its flag shows. Every setting can be overridden on the command line (``--field-name
VALUE``) and, with a server, in the web UI of a cloned task. Also the settings of the short
fine-tune at a new image size (`FinetuneConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

from components.common.cli import nonnegative_float, nonnegative_int, positive_float, positive_int
from components.common.errors import ConfigError
from model import MODEL_PRESETS, check_stem, model_config


def setting(default, help: str):  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    model: str = setting(
        "vit-ti16", "model size: a preset of model/presets.py (vit-tiny-test, vit-mini, vit-ti16, vit-s16, vit-b16)"
    )
    image_size: int = setting(
        224, "the model's image size (square): its position embeddings' grid, validation and checkpoints"
    )
    train_sizes: str = setting(
        "",
        "image sizes to train at, one drawn per step, comma-separated (e.g. 160,224,288): the position "
        "embeddings are interpolated to each, which keeps the model accurate at sizes it was not trained at; "
        "empty: image_size alone",
    )
    patch_size: int = setting(0, "patch size; 0 keeps the model preset's")
    stem: str = setting(
        "linear",
        "how images become tokens: linear (the paper's patch projection) or conv (convolutions and max-pools, "
        "after Compact Convolutional Transformers, for small data sets; needs a power-of-2 patch size)",
    )
    attention: str = setting("sdpa", "attention implementation: separate, fused or sdpa")
    epochs: int = setting(100, "training epochs (with --time-budget, the most it may train)")
    time_budget: float = setting(
        0.0,
        "seconds the whole run may take, start to end: the pace of the epochs so far decides how many (at most "
        "--epochs) fit, until half of them are done, the learning-rate schedule is fitted to them, and a run that "
        "falls behind stops where the next epoch would end past the budget; 0: no budget",
    )
    batch_size: int = setting(128, "images per step")
    lr: float = setting(1e-3, "peak learning rate of AdamW")
    min_lr: float = setting(1e-5, "learning rate at the end of the cosine decay")
    warmup_epochs: float = setting(5.0, "epochs of linear warm-up")
    weight_decay: float = setting(0.05, "AdamW weight decay (not on biases, norms, class token, position embeddings)")
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy")
    grad_clip: float = setting(1.0, "maximum global gradient norm; 0 disables clipping")
    dropout_rate: float = setting(0.0, "dropout after attention, projections and MLP layers")
    drop_path_rate: float = setting(0.1, "stochastic depth rate of the last block (rising linearly from 0)")
    crop_scale: float = setting(0.35, "smallest area fraction of RandomResizedCrop; 1 disables cropping")
    hflip: bool = setting(True, "random horizontal flips (true/false)")
    rand_augment: int = setting(0, "operations per image from RandAugment's 14 (torchvision's list); 0 disables")
    random_erasing: float = setting(0.0, "probability of erasing a random rectangle")
    mixup_alpha: float = setting(0.0, "Beta parameter of mixup; 0 disables it")
    cutmix_alpha: float = setting(0.0, "Beta parameter of cutmix; 0 disables it")
    ema_decay: float = setting(
        0.0,
        "per-step decay of an exponential moving average of the weights, which is then what is validated and "
        "saved as best.pt (e.g. 0.998); 0 disables it",
    )
    compile: str = setting(
        "auto",
        "torch.compile's mode: auto (reduce-overhead, i.e. with CUDA graphs, on a GPU; off on a CPU), off, "
        "default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs",
    )
    log_every: int = setting(10, "steps between reports of the training loss (read without waiting for the device)")
    validate_every: int = setting(
        1, "epochs between validations (the last epoch always validates); checkpoints follow them"
    )
    checkpoint_minutes: float = setting(
        1.0, "least minutes between checkpoints (the last epoch always saves); 0: at every validation"
    )
    seed: int = setting(0, "random seed: initialisation, data order, augmentation, dropout")
    init: str = setting(
        "",
        "start from these weights instead of a random initialisation: timm:<model name> (pretrained, "
        "downloaded), a file holding a timm VisionTransformer state dict or a checkpoint of this project, or a "
        "ClearML model id; the head is new, the position embeddings are resized to --image-size; empty: from "
        "scratch",
    )


PRESETS: dict[str, TrainConfig] = {
    # The whole pipeline on 2 CPU cores, quickly: tiny model, 32x32 images (its time:
    # benchmarks/RESULTS.md, "CPU timings").
    "smoke": TrainConfig(
        model="vit-tiny-test",
        image_size=32,
        epochs=10,
        batch_size=64,
        lr=2e-3,
        warmup_epochs=0.5,
        drop_path_rate=0.0,
        crop_scale=0.6,
    ),
    # Ten minutes of training on any CPU: six narrow blocks over a 6x6 grid of tokens from 24x24
    # images, made by a convolutional tokenizer (two convolutions and max-pools, after Compact
    # Convolutional Transformers) instead of the paper's linear patch projection: in the same
    # 600 s it ended every one of three seeds with a lower validation loss than 8x8 patches of
    # 48x48 images, though an epoch costs 1.7 times as much. Random erasing of a quarter of the
    # images lowered every seed's validation loss again (test 86.2%, 86.4% and 85.4% against
    # 85.2%, 86.0% and 84.4%, in 44-52 epochs on 2 cores of an AMD EPYC on a fast day; 28-31 on
    # a slow one; at most 90). Crops keep at least 80% of an image: with 50%, the model saw
    # garments larger than the test images show and learnt 5 points less in the same time
    # (benchmarks/RESULTS.md, "How we got here" and "cpu-10min against the classic baselines").
    "cpu-10min": TrainConfig(
        model="vit-mini",
        image_size=24,
        patch_size=4,
        stem="conv",
        epochs=90,
        time_budget=600,
        batch_size=128,
        lr=2e-3,
        warmup_epochs=5,
        drop_path_rate=0.05,
        crop_scale=0.8,
        random_erasing=0.25,
    ),
    # ViT-Ti/16 at 224 after the paper and DeiT, for a GPU: AdamW with warm-up and cosine decay,
    # label smoothing, stochastic depth, random erasing, mixup and cutmix, and a long schedule,
    # which a small data set needs and a GPU makes cheap (a few thousand images an epoch). No RandAugment:
    # it cost accuracy at 384 and gained none at 224. Training at 160, 224 and 288 (patch grids
    # 10, 14, 18) keeps the model accurate at 384 without a fine-tune (benchmarks/RESULTS.md,
    # "The recipe at 224" and "How we got here").
    "vit-ti16-224": TrainConfig(
        model="vit-ti16",
        image_size=224,
        train_sizes="160,224,288",
        epochs=600,
        batch_size=256,
        lr=1e-3,
        warmup_epochs=10,
        weight_decay=0.05,
        drop_path_rate=0.1,
        random_erasing=0.25,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        validate_every=5,
    ),
    # ViT-Ti/16 at 224 fine-tuned from pretrained weights (timm's AugReg ViT-Ti/16, trained on
    # ImageNet-21k and fine-tuned on ImageNet-1k; downloaded, so for a machine with the internet).
    # Fine-tuning's short, gentle schedule: the ViT paper fine-tunes with SGD (momentum 0.9, no
    # weight decay, a few thousand steps of cosine decay, learning rates 0.001 to 0.03); with this
    # trainer's AdamW, a tenth of training's peak rate, one epoch of warm-up and 30 epochs, and
    # no mixup or random erasing: pretrained features need less regularisation. No layer-wise
    # learning-rate decay (BEiT's): nothing here measures it to pay.
    "finetune": TrainConfig(
        model="vit-ti16",
        image_size=224,
        init="timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        epochs=30,
        batch_size=128,
        lr=1e-4,
        min_lr=1e-6,
        warmup_epochs=1,
        weight_decay=0.05,
        drop_path_rate=0.1,
        crop_scale=0.35,
        validate_every=1,
    ),
}


# Settings that must be above 0; every other number must be at least 0.
POSITIVE = {"image_size", "epochs", "batch_size", "lr", "log_every", "validate_every"}


def preset(name: str, **overrides) -> TrainConfig:
    """The preset ``name`` with ``overrides``, every setting checked."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - {setting.name for setting in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training settings {sorted(unknown)}")
    config = replace(PRESETS[name], **overrides)
    if config.model not in MODEL_PRESETS:
        raise ConfigError(f"--model {config.model!r}: choose one of {', '.join(MODEL_PRESETS)}")
    for setting in fields(TrainConfig):
        value = getattr(config, setting.name)
        if setting.type in ("int", "float") and not (value > 0 if setting.name in POSITIVE else value >= 0):
            least = "above 0" if setting.name in POSITIVE else "0 or more"
            raise ConfigError(f"--{setting.name.replace('_', '-')} must be {least}, got {value}")
    check_crop_scale(config.crop_scale, "--crop-scale")
    try:
        check_stem(config.stem, architecture(config)["patch_size"])
    except ValueError as error:
        raise ConfigError(f"--stem {config.stem}: {error}") from None
    check_image_size(config.image_size, architecture(config)["patch_size"], "--image-size")
    return config


def check_image_size(size: int, patch_size: int, flag: str) -> None:
    """A ViT cuts its images into whole patches."""
    if size % patch_size:
        lower, higher = size // patch_size * patch_size, (size // patch_size + 1) * patch_size
        nearest = f"{lower} or {higher}" if lower else str(higher)
        raise ConfigError(f"{flag} {size} is not a multiple of the patch size {patch_size}; e.g. {nearest}")


def architecture(config: TrainConfig) -> dict:
    """The model's architecture (``ViT`` constructor arguments) a training configuration names:
    its model preset's, with its own patch size where it sets one, and its stem."""
    return model_config(
        config.model, stem=config.stem, **({"patch_size": config.patch_size} if config.patch_size else {})
    )


def check_crop_scale(scale: float, flag: str) -> None:
    """A random-resized crop keeps between ``scale`` and all of an image's area."""
    if not 0 < scale <= 1:
        raise ConfigError(
            f"{flag} must be in (0, 1]: the smallest area fraction a crop keeps, 1 for whole images; got {scale}"
        )


def add_override_flags(parser) -> None:
    """One ``--field-name`` flag per setting of TrainConfig, defaulting to the preset's value."""
    group = parser.add_argument_group("overrides of the preset's settings")
    for setting in fields(TrainConfig):
        if setting.name in POSITIVE:
            kind = {"int": positive_int, "float": positive_float}[setting.type]
        else:
            kind = {"bool": _bool, "int": nonnegative_int, "float": nonnegative_float}.get(setting.type, str)
        group.add_argument(
            f"--{setting.name.replace('_', '-')}",
            type=kind,
            default=None,
            metavar=setting.type.upper(),
            help=f"{setting.metadata['help']} (default: the preset's)",
        )


def overrides_from(args) -> dict:
    values = {setting.name: getattr(args, setting.name) for setting in fields(TrainConfig)}
    return {name: value for name, value in values.items() if value is not None}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


HIGHRES_SIZE = 384  # the paper's fine-tuning resolution for models trained at 224


@dataclass(frozen=True)
class FinetuneConfig:
    """A short fine-tune at a new image size (`components.common.resize.finetune`): SGD with
    momentum, cosine decay from ``lr`` to 0 without warm-up, gradient clipping at 1, a flip and
    the crop of ``crop_scale`` but no RandAugment or erasing. It carries the fields that
    `learning_rate`, `optimization_step` and the augmentation's draws read, as a `TrainConfig` does."""

    SETTINGS: ClassVar = ("steps", "lr", "batch_size", "crop_scale")  # what a command line or the web UI sets

    steps: int = 300
    lr: float = 0.01
    batch_size: int = 64
    crop_scale: float = 1.0  # whole images: the fine-tune is at the size the model is tested at
    seed: int = 0
    hflip: bool = True
    min_lr: float = 0.0
    grad_clip: float = 1.0
    rand_augment: int = 0
    random_erasing: float = 0.0

    def __post_init__(self):
        check_crop_scale(self.crop_scale, "--finetune-crop-scale")
