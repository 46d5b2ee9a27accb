"""A step's console output as a text file reads: each line as a terminal last showed it.

Progress bars redraw one line with carriage returns many times a second; written to a file as
they come, they make a log of one enormous line. Keeping, of each line, what follows its last
carriage return keeps the messages and each bar's final state."""

from __future__ import annotations

from typing import BinaryIO


class TerminalLog:
    """Wraps a binary file: ``write`` takes the raw output in chunks of any size, ``close``
    writes what is left of the last line."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.pending = b""

    def write(self, chunk: bytes) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self.file.write(shown(line) + b"\n")
        self.file.flush()

    def close(self) -> None:
        if shown(self.pending):
            self.file.write(shown(self.pending) + b"\n")
        self.file.close()

    def __enter__(self) -> TerminalLog:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def shown(line: bytes) -> bytes:
    """What a terminal shows of one line: the text after its last carriage return that is
    followed by text (tqdm ends a cleared bar with one), trailing spaces dropped."""
    parts = [part for part in line.rstrip(b"\r").split(b"\r") if part.strip()]
    return parts[-1].rstrip() if parts else b""
