"""Checkpoints: a plain state_dict plus the model config (and training state), written
atomically and read back with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import io
import pickle
import threading
import zipfile
from pathlib import Path

import torch

from components.common.atomic import atomic_path
from components.common.errors import CheckpointError, first_line
from model import ViT

BEST, LAST = "best.pt", "last.pt"  # a training run's best validated weights, and all a resume needs


def payload(weights: dict, config: dict, classes: list[str], **training) -> dict:
    """What a checkpoint file holds: a plain state dict, the model's config (the ``ViT``
    constructor's arguments) and the class names; last.pt adds the training state."""
    return {"model": weights, "config": config, "classes": classes, **training}


def side(model: ViT) -> int:
    """The image size a model takes, in pixels a side (every model this project trains is square)."""
    return model.image_size[0]


def patch_size(reference: str | Path) -> int:
    """The patch size of a checkpoint's model, read before the model is built."""
    return int(load(reference)["config"]["patch_size"])


def is_checkpoint(loaded) -> bool:
    """Whether what a file held is one of `payload`'s."""
    return isinstance(loaded, dict) and {"model", "config"} <= set(loaded)


def save_atomic(payload: dict, path: Path) -> Path:
    """Writes beside ``path`` and renames: a killed run leaves the previous checkpoint intact.
    Serialised in memory first: torch.save's own writer reports a full disk only as
    "unexpected pos", a plain file write says which file and why (`WriteError`)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getbuffer())
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


def local_copy(reference: str | Path, role: str = "checkpoint") -> Path:
    """A checkpoint file: ``reference`` itself, or with a ClearML server, the local copy of
    the registered model of that id, recorded as the running task's input ``role``."""
    path = Path(reference)
    if path.is_file():
        return path
    from components.common.tracking import registered_model, server_configured

    if not server_configured():
        raise CheckpointError(f"no checkpoint at {path}; pass the .pt file that train wrote (see its train.json)")
    return registered_model(str(reference), role)


PASS_ANOTHER = "pass a .pt file that train wrote"  # what to do instead, where a checkpoint is asked for


def read_weights(path: Path, advice: str = PASS_ANOTHER):
    """What ``torch.save`` wrote to ``path``, read without running any code it might hold; a file
    that is damaged, of another kind or holds objects is a `CheckpointError` that ends with
    ``advice``, what to do instead where the file was asked for."""
    if not zipfile.is_zipfile(path):  # what torch.save writes; a cut-off file has lost its directory
        raise CheckpointError(
            f"{path} is not a readable checkpoint (damaged, cut off or another kind of file); {advice}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses objects other than tensors and plain values
        raise CheckpointError(
            f"{path} holds objects other than weights, which are not loaded (they could run code); {advice}"
        ) from None
    except RuntimeError as error:  # a damaged zip record
        raise CheckpointError(f"{path} is damaged ({first_line(error)}); {advice}") from None


def load(reference: str | Path, advice: str = PASS_ANOTHER) -> dict:
    """A checkpoint of this project, read without running any code it might hold; refused with
    ``advice`` (see `read_weights`)."""
    path = local_copy(reference)
    checkpoint = read_weights(path, advice)
    if not is_checkpoint(checkpoint):
        raise CheckpointError(f"{path} is not a checkpoint of this project (it lacks 'model' and 'config')")
    return checkpoint


def load_model(reference: str | Path, attention: str | None = None) -> tuple[ViT, dict]:
    """The model of a checkpoint (optionally with another attention implementation) and the
    checkpoint itself."""
    checkpoint = load(reference)
    config = dict(checkpoint["config"])
    if attention:
        config["attention"] = attention
    try:
        model = ViT(**config)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as error:  # a config ViT does not take, weights of another shape
        raise CheckpointError(
            f"{reference}: its weights do not fit the model its config describes ({first_line(error)}); pass a .pt "
            f"file that train wrote"
        ) from None
    return model, checkpoint
