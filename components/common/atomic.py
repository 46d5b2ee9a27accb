"""Writing files so that a killed process leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.common.errors import WriteError

# `atomic_path`'s temporary files, which a killed write leaves behind: a name of the project's own,
# so that cleaning them up (`run_folder`) never touches another program's temporary files.
TEMPORARY_SUFFIX = ".headgear.tmp"
TEMPORARY_GLOB = f".*{TEMPORARY_SUFFIX}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block
    succeeds, removed when it fails. An OSError on the way becomes a `WriteError` naming
    ``path``; ``path`` is then as it was before."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
        os.close(handle)
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            reason = error.strerror or str(error)
            raise WriteError(f"could not write {path}: {reason}") from error
        raise


def write_json(payload, path: Path) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2))
    return Path(path)
