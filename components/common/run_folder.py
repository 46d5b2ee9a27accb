"""A run folder belongs to one run at a time.

Two runs writing into one folder would mix their settings and results (each reads back what the
other wrote), so a run claims its folder first: the claim is a lock the kernel holds for the
process (``flock`` on ``<folder>/.lock``), released when it ends however it ends, so a killed run
leaves none behind. The lock file names its holder, for the refusal a second run gets.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.common.atomic import TEMPORARY_GLOB
from components.common.errors import ConfigError

LOCK = ".lock"


@contextmanager
def claimed(
    folder: Path,
    holds_a_run: Path | None = None,
    overwrite: bool = False,
    advice: str = "pass another --output, or --overwrite to replace it",
) -> Iterator[Path]:
    """Holds ``folder`` for this process for the block. Refused at once, naming the holder, while
    another process holds it; refused too when ``holds_a_run`` (a file inside it that a run
    leaves) exists, unless ``overwrite``, with ``advice``. Removes, and lists, the temporary
    files a killed writer left in it (not in subfolders that are claimed on their own)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "a+")  # noqa: SIM115 - held open for the whole block
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{folder} is in use by {holder}; wait for it to end, or pass another --output") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({' '.join(sys.argv)[:300]})")
        handle.flush()
        if holds_a_run is not None and holds_a_run.exists() and not overwrite:
            raise ConfigError(f"{folder} holds an earlier run ({holds_a_run.relative_to(folder)}); {advice}")
        remove_stale_temporaries(folder)
        yield folder
    finally:
        handle.close()  # releases the lock


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Removes the temporary files of writes that never finished (`components.common.atomic`)
    from ``folder`` and its subfolders, leaving those claimed on their own; says which."""
    stale = []
    for path in sorted(folder.rglob(TEMPORARY_GLOB)):
        subfolders = path.relative_to(folder).parents[:-1]  # from the file's folder up to, not with, ``folder``
        if not any((folder / subfolder / LOCK).exists() for subfolder in subfolders):
            path.unlink(missing_ok=True)
            stale.append(path)
    if stale:
        shown = ", ".join(str(path.relative_to(folder)) for path in stale[:5])
        print(f"note: removed {len(stale)} temporary files that a killed write left in {folder}: {shown}")
    return stale
