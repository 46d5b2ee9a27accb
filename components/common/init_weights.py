"""Initial weights for training (``--init SOURCE``): a pretrained start instead of a random one.

``SOURCE`` is ``timm:<model name>`` (timm's pretrained weights, downloaded where the machine
has the internet; timm is needed only for this), a local file holding a timm
``VisionTransformer`` state dict (as ``torch.save(model.state_dict(), FILE)`` writes it, also
inside ``{"model": ...}`` or ``{"state_dict": ...}``) or one of this project's checkpoints, or
(with a ClearML server) the id of a registered model.

The weights go through ``ViT.from_timm``'s mapping, the classification head is left out (the
model keeps its own fresh head for the data's classes), and the position embeddings are
interpolated to the model's patch grid when the image size or the source's grid differs. An
architecture that differs (stem, width, depth, heads, MLP size, patch size) is refused with the
setting to change, before the data is touched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from components.common import checkpoints
from components.common.errors import CheckpointError, ConfigError, first_line
from model import MODEL_PRESETS, resize_pos_embed
from model.timm_convert import architecture_from_timm_state, config_from_timm, state_dict_from_timm, timm_state_to_ours

ARCHITECTURE = ("stem", "patch_size", "in_channels", "embed_dim", "qkv_dim", "mlp_hidden_size", "n_layers", "n_heads")
PAPER_STEM = {"stem": "linear"}  # timm's ViTs and this project's checkpoints from before the setting have it
POS_EMBED = "projector.pos_embed"


class InitialWeights(NamedTuple):
    state: dict[str, torch.Tensor]  # every parameter of the model but its head
    description: str  # where they come from, for the log


def initial_weights(source: str, model_config: dict) -> InitialWeights:
    """The weights of ``source`` for a model of ``model_config`` (``ViT`` constructor arguments:
    its architecture and ``image_size``), without the head, the position embeddings resized to
    the model's grid. Raises ValueError, saying what to change, for an architecture other than
    the model's or a source that cannot be read."""
    state, architecture, grid, description = _read(source)
    architecture = {**PAPER_STEM, **architecture}
    ours = {"in_channels": 3, **PAPER_STEM, **model_config}
    attention_width = architecture.pop("attention_width", None)  # a timm state dict holds no head count
    _check_architecture(source, architecture, ours)
    if attention_width is not None and attention_width != ours["n_heads"] * ours["qkv_dim"]:
        raise ConfigError(
            f"--init {source}: its attention is {attention_width} wide, this model's n_heads x qkv_dim is "
            f"{ours['n_heads']} x {ours['qkv_dim']}: choose a --model whose heads make {attention_width}"
        )
    size = ours["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    target = (height // ours["patch_size"], width // ours["patch_size"])
    state = {name: tensor for name, tensor in state.items() if not name.startswith("head.")}
    state[POS_EMBED] = resize_pos_embed(state[POS_EMBED], grid, target)
    return InitialWeights(state, description)


def _read(source: str) -> tuple[dict, dict, tuple[int, int], str]:
    """(our state dict, the source's architecture, its patch grid, description)."""
    if source.startswith("timm:"):
        return _from_timm(source)
    try:
        path = checkpoints.local_copy(source, role="initial weights")
    except CheckpointError:
        raise ConfigError(
            f"--init {source}: no such file; give timm:<model name>, a file holding a timm VisionTransformer "
            f"state dict or a checkpoint of this project, or (with a ClearML server) a model id"
        ) from None
    try:
        loaded = checkpoints.read_weights(path, "pass a .pt file that train wrote or a timm state dict, or timm:<name>")
    except CheckpointError as error:
        raise ConfigError(f"--init {source}: {error}") from None
    if checkpoints.is_checkpoint(loaded):
        config = loaded["config"]
        grid = tuple(side // config["patch_size"] for side in config["image_size"])
        architecture = {name: config[name] for name in ARCHITECTURE if name in config}
        return loaded["model"], architecture, grid, f"checkpoint {source}"
    for wrapper in ("model", "state_dict"):  # how DeiT's and other training scripts save them
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or "patch_embed.proj.weight" not in loaded:
        raise ConfigError(
            f"--init {source}: {path} is neither a timm VisionTransformer state dict nor a checkpoint of this project"
        )
    try:
        architecture = architecture_from_timm_state(loaded)
    except ValueError as error:
        raise ConfigError(f"--init {source}: {error}") from None
    grid = architecture.pop("grid")
    return timm_state_to_ours(loaded), architecture, grid, f"timm state dict {source}"


HUB_TIMEOUT_S = 5.0
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's repositories on the Hub hold


def hub_answers(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face Hub, where timm's pretrained weights come from, answers at all."""
    import requests
    from huggingface_hub import constants

    try:
        requests.head(constants.ENDPOINT, timeout=timeout_s)
    except requests.RequestException:
        return False
    return True


def check_timm_source(source: str) -> None:
    """Refuses, in seconds, ``timm:<name>`` weights this machine cannot have: the Hugging Face Hub
    does not answer and they are not in its cache (timm keeps its weights on the Hub, in the
    repository `_hub_repository` names)."""
    if hub_answers():
        return
    from huggingface_hub import try_to_load_from_cache

    if not any(isinstance(try_to_load_from_cache(_hub_repository(source), file), str) for file in TIMM_WEIGHT_FILES):
        raise ConfigError(
            f"--init {source}: the Hugging Face Hub did not answer within {HUB_TIMEOUT_S:g} s and these weights are "
            f"not in its cache here; run where the Hub can be reached, or pass a file holding the weights"
        )


def _hub_repository(source: str) -> str:
    """Where on the Hub timm keeps ``timm:<name>``'s weights: its pretrained configuration says (a
    name without a tag takes timm's default one, e.g. ``.augreg_in21k_ft_in1k``)."""
    name = source.removeprefix("timm:")
    try:
        from timm.models import get_pretrained_cfg

        config = get_pretrained_cfg(name)
    except Exception:  # no timm, or a name it does not know: the plain name is the best guess
        config = None
    return getattr(config, "hf_hub_id", None) or f"timm/{name}"


def _from_timm(source: str) -> tuple[dict, dict, tuple[int, int], str]:
    name = source.removeprefix("timm:")
    try:
        import timm
    except ImportError:
        raise ConfigError(f"--init {source}: timm is not installed; pip install timm, or pass a local file") from None
    reachable = hub_answers()
    if not reachable:  # only weights already in the cache, at once: no download, no retries
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as error:  # unknown name, no internet, no such weights: timm raises many kinds
        unreachable = "" if reachable else f"; the Hugging Face Hub did not answer within {HUB_TIMEOUT_S:g} s"
        raise ConfigError(
            f"--init {source}: timm could not give its pretrained weights ({first_line(error)}{unreachable}); the "
            f"download needs the internet (the Hugging Face Hub), else save them where it works and pass the file"
        ) from None
    try:
        config = config_from_timm(model)
    except ValueError as error:
        raise ConfigError(f"--init {source}: {error}") from None
    architecture = {"in_channels": 3, **{key: config[key] for key in ARCHITECTURE if key in config}}
    grid = tuple(model.patch_embed.grid_size)
    return state_dict_from_timm(model), architecture, grid, f"timm {name} (pretrained)"


def _check_architecture(source: str, theirs: dict, ours: dict) -> None:
    differing = [name for name in ARCHITECTURE if name in theirs and theirs[name] != ours[name]]
    if not differing:
        return
    shapes = ", ".join(f"{name} {theirs[name]} (this model: {ours[name]})" for name in differing)
    body = {name: value for name, value in theirs.items() if name not in ("stem", "patch_size", "in_channels")}
    matching = [preset for preset, sizes in MODEL_PRESETS.items() if all(sizes.get(k, v) == v for k, v in body.items())]
    if set(differing) <= {"stem", "patch_size"}:
        fix = f"--patch-size {theirs['patch_size']}" if "patch_size" in differing else ""
    elif matching:
        patch = theirs["patch_size"]
        fix = f"--model {matching[0]}" + (
            "" if MODEL_PRESETS[matching[0]]["patch_size"] == patch else f" --patch-size {patch}"
        )
    else:
        fix = "a --model of that architecture (add it to model/presets.py)"
    if "stem" in differing:
        fix = f"{fix} --stem {theirs['stem']}".strip()
    raise ConfigError(f"--init {source}: its weights are for another architecture, {shapes}: train with {fix}")
