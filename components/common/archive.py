"""Extracting a zip archive safely: nothing outside the target, no links, no more than the
limits allow (a zip bomb), no damaged member."""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from components.common.errors import DataError, WriteError

# Generous for the 200 MB headgear archive (JPEGs barely compress), far below what a zip bomb inflates to.
DEFAULT_MAX_EXTRACT_GB, DEFAULT_MAX_RATIO = 10.0, 100.0


RATIO_FLOOR = 1_000_000  # a small archive of text compresses well and is no bomb: the ratio counts beyond 1 MB


def extraction_limits() -> tuple[int, float]:
    """The most bytes an archive may extract to and the most its size may grow by:
    ``HEADGEAR_MAX_EXTRACT_GB`` and ``HEADGEAR_MAX_RATIO`` (default 10 GB and 100)."""
    values = []
    settings = (("HEADGEAR_MAX_EXTRACT_GB", DEFAULT_MAX_EXTRACT_GB), ("HEADGEAR_MAX_RATIO", DEFAULT_MAX_RATIO))
    for name, default in settings:
        text = os.environ.get(name, "")
        try:
            value = float(text) if text else default
        except ValueError:
            value = -1.0
        if not value > 0:
            raise DataError(f"{name}={text!r}: expected a number above 0 (default {default:g})")
        values.append(value)
    return int(values[0] * 1e9), values[1]


def safe_extract(
    archive: Path, target: Path, max_bytes: int | None = None, max_ratio: float | None = None
) -> list[str]:
    """Extracts a zip, refusing it whole if any entry would land outside ``target`` (absolute
    paths, ``..``) or is a link, if it would extract to more than ``max_bytes`` or grow more
    than ``max_ratio`` times (`extraction_limits` by default), if a member is damaged, or if
    two members of one name (which zip allows) differ. The sizes are the headers'; zipfile
    inflates no more than they say, and a member whose header lies fails its CRC check and is
    reported damaged. Returns notes on what was changed on the way (members stored twice)."""
    default_bytes, default_ratio = extraction_limits()
    max_bytes, max_ratio = max_bytes or default_bytes, max_ratio or default_ratio
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as error:
        raise DataError(f"{archive} is not a readable zip archive ({error}); download it again") from None
    with zf:
        members = zf.infolist()
        hostile = []
        for info in members:
            path = PurePosixPath(info.filename.replace("\\", "/"))
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]) or is_link:
                hostile.append(info.filename)
        if hostile:
            raise DataError(
                f"refusing to extract {archive}: {len(hostile)} entries would land outside the target "
                f"or are links: {', '.join(hostile[:10])}"
            )
        if not members:
            raise DataError(f"{archive} is an empty zip archive; pass the headgear archive")
        compressed = max(1, sum(info.compress_size for info in members))
        declared = sum(info.file_size for info in members)
        limit = min(max_bytes, max(int(compressed * max_ratio), RATIO_FLOOR))
        if declared > limit:
            raise DataError(_too_big(archive, declared, compressed, max_bytes, max_ratio))
        members, notes = _one_per_name(archive, zf, members)
        for info in members:
            destination = Path(target, *PurePosixPath(info.filename.replace("\\", "/")).parts)
            if info.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
                raise DataError(
                    f"{archive}: the member {info.filename} is damaged ({type(error).__name__}: {error}); "
                    f"download the archive again"
                ) from None
            except OSError as error:  # a full disk: the scratch folder lies under TMPDIR
                raise WriteError(
                    f"could not extract {archive} to {destination}: {error.strerror}; free some space there or "
                    f"point TMPDIR at a larger disk"
                ) from None
    return notes


def _one_per_name(archive: Path, zf: zipfile.ZipFile, members: list[zipfile.ZipInfo]):
    """The members to extract, one per path they extract to (``\\`` read as ``/``, ``./`` and ``//``
    dropped, as `safe_extract` places them), and a note on the paths stored twice: the same bytes
    twice are extracted once; different bytes for one path are refused, since which of them is
    meant cannot be known."""
    folders = [info for info in members if info.is_dir()]
    by_name: dict[str, list[zipfile.ZipInfo]] = {}
    for info in members:
        if not info.is_dir():
            name = "/".join(PurePosixPath(info.filename.replace("\\", "/")).parts)
            by_name.setdefault(name, []).append(info)
    repeated = {name: infos for name, infos in by_name.items() if len(infos) > 1}
    for name, infos in repeated.items():
        try:
            differ = len({(info.CRC, info.file_size) for info in infos}) > 1 or len({zf.read(i) for i in infos}) > 1
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise DataError(f"{archive}: the member {name} is damaged ({error}); download the archive again") from None
        if differ:
            raise DataError(
                f"{archive} holds {len(infos)} different files under one name, {name}; which is meant cannot be "
                f"known: remove all but one from the archive"
            )
    if not repeated:
        return members, []
    shown = ", ".join(list(repeated)[:5])
    note = f"{archive.name} stores {len(repeated)} members twice with the same content, extracted once: {shown}"
    return folders + [infos[0] for infos in by_name.values()], [note]


def _too_big(archive: Path, size: int, compressed: int, max_bytes: int, max_ratio: float) -> str:
    return (
        f"refusing to extract {archive}: it inflates to {_size(size)} or more from {_size(compressed)}, beyond "
        f"the limits of {_size(max_bytes)} and {max_ratio:g} times its size; if it is the real data, raise "
        f"HEADGEAR_MAX_EXTRACT_GB / HEADGEAR_MAX_RATIO"
    )


def _size(count: float) -> str:
    for unit in ("bytes", "kB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.2f} GB"
