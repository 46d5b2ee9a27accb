"""What the components' command lines share: a parser whose errors are one line, number and
output types that argparse checks, and `run`, which turns the project's own errors (bad input,
wrong settings, an unusable server, a damaged checkpoint, a failed write) into one line on
stderr and exit status 2. Any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from components.common.errors import INPUT_ERRORS

Result = TypeVar("Result")


class Parser(argparse.ArgumentParser):
    """argparse's parser with the module docstring as description, and errors on one line
    (argparse's own would print the whole usage first)."""

    def __init__(self, prog: str, description: str | None, **kwargs):
        super().__init__(
            prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
        )

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def run(parser: argparse.ArgumentParser, function: Callable[..., Result], *args, **kwargs) -> Result:
    """``function(*args, **kwargs)``; the project's own errors end the process with one line."""
    try:
        return function(*args, **kwargs)
    except INPUT_ERRORS as error:
        parser.exit(2, f"{parser.prog}: error: {one_line(str(error))}\n")


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _number(kind: type, what: str, accepted: Callable[[float], bool]) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accepted(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, "a whole number of 1 or more", lambda value: value >= 1)
nonnegative_int = _number(int, "a whole number of 0 or more", lambda value: value >= 0)
positive_float = _number(float, "a number above 0", lambda value: value > 0)
nonnegative_float = _number(float, "a number of 0 or more", lambda value: value >= 0)


def output_folder(text: str) -> Path:
    """An argparse type: a folder that exists or can be made and can be written to, checked by
    writing to it, so that a run does not find out after its work that it cannot save it."""
    folder = Path(text).expanduser()
    if folder.exists() and not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{folder} is a file, not a folder; pass a folder for the outputs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".writable-"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"cannot write to {folder} ({error.strerror}); pass a folder you can write to"
        ) from None
    return folder


def output_file(text: str) -> Path:
    """An argparse type: a file path whose folder `output_folder` accepts."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; pass the path of the file to write")
    output_folder(str(path.parent))
    return path


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    """``--device``: where a command computes."""
    parser.add_argument(
        "--device", type=device_name, default="auto", help="auto (the GPU if there is one) | cpu | cuda[:N] (auto)"
    )


def device_name(text: str) -> str:
    """An argparse type: ``auto`` or a device torch knows and this machine has."""
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda (cuda:N), got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device; pass --device cpu or auto")
    return text
