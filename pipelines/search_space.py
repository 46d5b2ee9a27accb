"""The settings a hyper-parameter search varies: declared once, used by both ways to search.

A dimension names a training setting (a field of `TrainConfig`, so a flag of
``components.train`` and a ``General/<name>`` parameter of a training task) and the values it
may take: a range on a linear or a logarithmic scale, or a list of choices. Each preset has a
default space (`default_space`), centred on its own settings; the command line narrows it
(`narrowed`). Optuna draws from it directly in the local mode (`suggest`), ClearML's
`HyperParameterOptimizer` gets it as its own parameter ranges (`to_clearml`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from components.common.errors import ConfigError
from components.common.presets import TrainConfig, architecture, preset
from model import MODEL_PRESETS

SECTION = "General"  # where `components.train` connects its settings on its ClearML task
SETTINGS = {setting.name: setting.type for setting in fields(TrainConfig)}
PROBABILITIES = {"dropout_rate", "drop_path_rate", "random_erasing", "label_smoothing"}  # below 1


@dataclass(frozen=True)
class Dimension:
    """One searched setting: ``low``..``high`` on a ``log`` or linear scale (whole numbers for an
    int setting), or one of ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.choices:
            return f"{self.name}={','.join(str(choice) for choice in self.choices)}"
        return f"{self.name}={self.low:g}:{self.high:g}{':log' if self.log else ''}"


def default_space(preset_name: str, **fixed) -> list[Dimension]:
    """The space searched unless the command line narrows it, around ``preset_name``'s own
    settings (with the ``fixed`` overrides every trial gets, e.g. fewer epochs): the learning
    rate and weight decay on a log scale, stochastic depth, warm-up (at most a fifth of the
    epochs), the batch size halved or doubled, and where the preset trains at one size from
    scratch the model size (those of its patch size and at most the next width up) and the
    image size one patch smaller or larger."""
    config = preset(preset_name, **fixed)
    space = [
        Dimension("lr", config.lr / 5, config.lr * 5, log=True),
        Dimension("weight_decay", 0.005, 0.3, log=True),
        Dimension("drop_path_rate", 0.0, 0.3),
        Dimension("warmup_epochs", 0.0, round(config.epochs / 5, 2)),
        Dimension("batch_size", choices=(config.batch_size // 2, config.batch_size, config.batch_size * 2)),
    ]
    if config.train_sizes or config.init:  # trained at several sizes, or from pretrained weights: kept
        return space
    patch = architecture(config)["patch_size"]
    # the model sizes cut like the preset's own (a --patch-size the preset sets applies to each)
    cut = MODEL_PRESETS[config.model]["patch_size"]
    ladder = [name for name in MODEL_PRESETS if MODEL_PRESETS[name]["patch_size"] == cut]
    position = ladder.index(config.model)
    space.append(Dimension("model", choices=tuple(ladder[max(0, position - 1) : position + 2])))
    sizes = (config.image_size - patch, config.image_size, config.image_size + patch)
    space.append(Dimension("image_size", choices=tuple(size for size in sizes if size > 0)))
    return space


def parse_dimension(spec: str, defaults: dict[str, Dimension]) -> Dimension:
    """``NAME=LOW:HIGH`` (the default dimension's scale, else linear), ``NAME=LOW:HIGH:log``,
    ``NAME=LOW:HIGH:linear`` or ``NAME=A,B,C`` (choices; one choice fixes the setting)."""
    name, equals, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not equals or not values:
        raise ConfigError(f"--space {spec!r}: expected NAME=LOW:HIGH[:log] or NAME=A,B,C, e.g. lr=1e-4:3e-3:log")
    if name not in SETTINGS:
        raise ConfigError(f"--space {spec!r}: {name!r} is not a training setting; the settings: {', '.join(SETTINGS)}")
    kind = SETTINGS[name]
    if ":" in values:
        parts = values.split(":")
        scale = parts[2] if len(parts) == 3 else ("log" if defaults.get(name, Dimension(name)).log else "linear")
        if kind not in ("int", "float") or len(parts) not in (2, 3) or scale not in ("log", "linear"):
            raise ConfigError(
                f"--space {spec!r}: a range is LOW:HIGH or LOW:HIGH:log (linear), for a numeric setting; "
                f"{name} is {kind}: give its choices, A,B,C"
            )
        low, high = (_number(name, kind, text, spec) for text in parts[:2])
        if not low < high:
            raise ConfigError(f"--space {spec!r}: LOW must be below HIGH; one value fixes it: {name}={parts[0]}")
        return Dimension(name, low, high, log=scale == "log")
    return Dimension(name, choices=tuple(_number(name, kind, text, spec) for text in values.split(",")))


def value_of(name: str, text: str):
    """``text`` as a value of the setting ``name`` (as a task's parameters hold it: a string)."""
    kind = SETTINGS[name]
    if kind == "bool":
        return {"true": True, "false": False}[text.strip().lower()]
    return {"int": int, "float": float}.get(kind, str)(text.strip())


def _number(name: str, kind: str, text: str, spec: str):
    try:
        return value_of(name, text)
    except (ValueError, KeyError):
        raise ConfigError(f"--space {spec!r}: {text!r} is not a value of {name} ({kind})") from None


def narrowed(preset_name: str, specs: list[str], only: list[str], **fixed) -> list[Dimension]:
    """The default space with each of ``specs`` replacing (or adding) its dimension, cut down to
    the names in ``only`` when given; every value checked against the preset."""
    space = {dimension.name: dimension for dimension in default_space(preset_name, **fixed)}
    for spec in specs:
        dimension = parse_dimension(spec, space)
        space[dimension.name] = dimension
    if only:
        unknown = [name for name in only if name not in space]
        if unknown:
            raise ConfigError(
                f"--only {','.join(unknown)}: not in the space ({', '.join(space)}); add it with --space NAME=..."
            )
        space = {name: space[name] for name in only}
    clash = set(space) & set(fixed)
    if clash:
        raise ConfigError(f"{', '.join(sorted(clash))} is both searched and fixed; drop it from --space or --only")
    if not space:
        raise ConfigError("the search space is empty; name at least one setting with --space or --only")
    for dimension in space.values():
        check(dimension, preset_name, fixed)
    return list(space.values())


def check(dimension: Dimension, preset_name: str, fixed: dict) -> None:
    """Refuses a dimension with a value the preset could not train with: each bound and choice
    goes through the preset's own checks (an image size, for one, must be a multiple of the
    preset's patch size), and probabilities stay below 1. Combinations are not checked: a model
    of another patch size with one of the image sizes fails its trial, which is recorded."""
    if dimension.log and dimension.low <= 0:
        raise ConfigError(f"--space {dimension.describe()}: a log scale needs LOW above 0")
    for value in dimension.choices or (dimension.low, dimension.high):
        try:
            preset(preset_name, **{**fixed, dimension.name: value})
        except ConfigError as error:
            raise ConfigError(
                f"--space {dimension.describe()}: outside what preset {preset_name} allows: {error}"
            ) from None
        if dimension.name in PROBABILITIES and not value < 1:
            raise ConfigError(f"--space {dimension.describe()}: {dimension.name} is a probability, below 1")


def suggest(trial, dimension: Dimension):
    """Optuna's draw of ``dimension`` for ``trial`` (a value of the setting's type)."""
    if dimension.choices:
        return trial.suggest_categorical(dimension.name, list(dimension.choices))
    if SETTINGS[dimension.name] == "int":
        return trial.suggest_int(dimension.name, int(dimension.low), int(dimension.high), log=dimension.log)
    return trial.suggest_float(dimension.name, dimension.low, dimension.high, log=dimension.log)


def to_clearml(dimension: Dimension):
    """The dimension as ClearML's parameter range of the training task's ``General/<name>``."""
    from clearml.automation import (
        DiscreteParameterRange,
        LogUniformParameterRange,
        UniformIntegerParameterRange,
        UniformParameterRange,
    )

    name = f"{SECTION}/{dimension.name}"
    if dimension.choices:
        return DiscreteParameterRange(name, values=list(dimension.choices))
    if SETTINGS[dimension.name] == "int":
        return UniformIntegerParameterRange(name, int(dimension.low), int(dimension.high), include_max_value=True)
    if dimension.log:
        return LogUniformParameterRange(name, math.log10(dimension.low), math.log10(dimension.high), base=10)
    return UniformParameterRange(name, dimension.low, dimension.high)
