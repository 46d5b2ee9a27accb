"""Checkpoints: a plain state_dict plus the model config (and training state), written
atomically and read back with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import torch

from components.atomic import atomic_path
from model import ViT


def save_atomic(payload: dict, path: Path) -> Path:
    """Writes beside ``path`` and renames: a killed run leaves the previous checkpoint intact."""
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


class CheckpointWriter:
    """Writes checkpoints from a background thread, so that training goes on while the files
    are written, where a GPU would otherwise idle (benchmarks/RESULTS.md, "Training
    throughput"): `save` copies the tensors to the host, the one wait for the
    device, and returns; `wait` returns once the last write is done, raising its error if it
    failed. One write at a time, each atomic (`save_atomic`)."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, files: dict[Path, dict]) -> None:
        self.wait()
        on_host = _on_host(files)  # training goes on changing the originals
        self._thread = threading.Thread(target=self._write, args=(on_host,), name="checkpoint writer")
        self._thread.start()

    def _write(self, files: dict[Path, dict]) -> None:
        try:
            for path, payload in files.items():
                save_atomic(payload, path)
        except BaseException as error:  # raised where the training loop waits
            self._error = error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _on_host(value):
    """A copy of ``value`` (nested dicts, lists and tuples) with its tensors copied to the host."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _on_host(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_host(item) for item in value)
    return value


def local_copy(reference: str | Path) -> Path:
    """A checkpoint file: ``reference`` itself, or with a ClearML server, the local copy of
    the registered model of that id."""
    path = Path(reference)
    if path.is_file():
        return path
    from components.tracking import server_configured

    if not server_configured():
        raise FileNotFoundError(f"no checkpoint at {path}; pass the .pt file that train wrote (see its train.json)")
    return _registered_model(str(reference))


@functools.cache
def _registered_model(model_id: str) -> Path:
    """The weights of a registered model, downloaded once per process and connected to the
    running task as its input model (the model's lineage in the web UI)."""
    from clearml import InputModel, Task

    try:
        model = InputModel(model_id=model_id)
        if Task.current_task() is not None:
            model.connect(Task.current_task(), name="checkpoint")
        return Path(model.get_local_copy(raise_on_error=True))
    except ValueError as error:
        raise FileNotFoundError(
            f"no checkpoint at {model_id} and no ClearML model {model_id} could be downloaded ({error}); pass a "
            f"checkpoint file or the id of a model that train registered with its weights uploaded "
            f"(the pipeline's --output-uri)"
        ) from None


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
