"""A run folder belongs to one run at a time.

Two runs writing into one folder would mix their settings and results (each reads back what the
other wrote), so a run claims its folder first: the claim is a lock the kernel holds for the
process (a POSIX record lock, ``lockf``, on ``<folder>/.lock``), released when it ends however it
ends, so a killed run leaves none behind. Unlike ``flock``'s, the lock is not shared with the
processes it forks (ClearML's reporter is one), which could outlive it. The lock file names its
holder, for the refusal a second run gets.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
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
    outputs: tuple[str, ...] = (),
) -> Iterator[Path]:
    """Holds ``folder`` for this process for the block. Refused at once, naming the holder, while
    another process holds it; refused too when ``holds_a_run`` (a file inside it that a run
    leaves) exists, unless ``overwrite``, with ``advice``; with ``overwrite`` the earlier run's
    ``outputs`` (names inside ``folder``) are removed first, so that none of them is taken for the
    new run's. Removes, and lists, the temporary files a killed writer left in it (not in
    subfolders that are claimed on their own)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK, "a+")  # noqa: SIM115 - held open for the whole block
    except OSError as error:
        raise ConfigError(f"cannot claim {folder} for this run ({error.strerror}); pass another --output") from None
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        if error.errno in (errno.EACCES, errno.EAGAIN):
            raise ConfigError(f"{folder} is in use by {holder}; wait for it to end, or pass another --output") from None
        raise ConfigError(f"cannot lock {folder} ({error.strerror}); pass an --output on a local disk") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({' '.join(sys.argv)[:300]})")
        handle.flush()
        if holds_a_run is not None and holds_a_run.exists():
            if not overwrite:
                raise ConfigError(f"{folder} holds an earlier run ({holds_a_run.relative_to(folder)}); {advice}")
            _remove_earlier_outputs(folder, outputs)
        remove_stale_temporaries(folder)
        yield folder
    finally:
        handle.close()  # releases the lock


def _remove_earlier_outputs(folder: Path, outputs: tuple[str, ...]) -> None:
    removed = []
    for name in outputs:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        print(f"note: --overwrite: removed the earlier run's {', '.join(removed)} from {folder}")


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
