"""Checkpoints: a plain state_dict plus the model config (and training state), written
atomically and read back with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import torch

from components.atomic import atomic_path
from model import ViT


def save_atomic(payload: dict, path: Path) -> Path:
    """Writes beside ``path`` and renames: a killed run leaves the previous checkpoint intact."""
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def local_copy(reference: str | Path) -> Path:
    """A checkpoint file: ``reference`` itself, or with a ClearML server, the local copy of
    the registered model of that id."""
    path = Path(reference)
    if path.is_file():
        return path
    from components.tracking import server_configured

    if server_configured():
        from clearml import InputModel

        return Path(InputModel(model_id=str(reference)).get_local_copy())
    raise FileNotFoundError(f"no checkpoint at {path}; pass the .pt file that train wrote (see its train.json)")


def load(reference: str | Path) -> dict:
    path = local_copy(reference)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not {"model", "config"} <= set(checkpoint):
        raise ValueError(f"{path} is not a checkpoint of this project (it lacks 'model' and 'config')")
    return checkpoint


def load_model(reference: str | Path, attention: str | None = None) -> tuple[ViT, dict]:
    """The model of a checkpoint (optionally with another attention implementation) and the
    checkpoint itself."""
    checkpoint = load(reference)
    config = dict(checkpoint["config"])
    if attention:
        config["attention"] = attention
    model = ViT(**config)
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint
