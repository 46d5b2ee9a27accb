"""Checkpoints: a plain state_dict plus the model config (and training state), written
atomically and read back with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from model import ViT


def save_atomic(payload: dict, path: Path) -> Path:
    """Writes to a temporary file beside ``path`` and renames it: a killed run leaves the
    previous checkpoint intact, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass the .pt file that train wrote (see its train.json)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not {"model", "config"} <= set(checkpoint):
        raise ValueError(f"{path} is not a checkpoint of this project (it lacks 'model' and 'config')")
    return checkpoint


def load_model(path: Path, attention: str | None = None) -> tuple[ViT, dict]:
    """The model of a checkpoint (optionally with another attention implementation) and the
    checkpoint itself."""
    checkpoint = load(path)
    config = dict(checkpoint["config"])
    if attention:
        config["attention"] = attention
    model = ViT(**config)
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint
