"""Bad input and faults, as a user meets them on the command line: each ends in one line on
stderr (`<component>: error: ...`) and exit status 2, never in a traceback, and leaves nothing
half-written behind. Each command runs as its own process, as a user would start it."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from components.common import cli
from components.common.data import prepare
from components.common.tracking import child_environment
from tests.archives import make_layout, zip_folder
from tests.ports import closed_port
from tests.repository import REPO

# Lines that are not the component's: torch's own start-up warnings and tqdm's progress bars.
NOISE = re.compile(r"^[IWE]\d{4} .*\] |^\S+: +\d+%\|")


def run(component: str, *args, env: dict | None = None, file_size_limit: int | None = None):
    def limit_file_size():  # a disk that takes no file larger than this, for real
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-m", f"components.{component}", *map(str, args)],
        cwd=REPO,
        env=env or child_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size if file_size_limit else None,
    )


def error_line(result: subprocess.CompletedProcess, component: str) -> str:
    """The one line a failed command printed, after checking that it is the only one."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and not NOISE.match(line)]
    assert len(lines) == 1, result.stderr[-3000:]
    assert result.returncode == 2 and lines[0].startswith(f"{component}: error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    return prepare(make_layout(root / "raw", per_split=(8, 2, 2)), root / "store").root


@pytest.mark.parametrize(
    ("component", "flag", "value"),
    [
        ("train", "--epochs", "0"),
        ("train", "--epochs", "-1"),
        ("train", "--batch-size", "0"),
        ("train", "--lr", "-0.1"),
        ("train", "--warmup-epochs", "-1"),
        ("evaluate", "--image-size", "0"),
        ("highres", "--finetune-batch-size", "0"),
        ("highres", "--finetune-steps", "-5"),
        ("highres", "--finetune-lr", "abc"),
    ],
)
def test_non_positive_numbers_are_refused_by_argparse(component, flag, value, tmp_path):
    common = {
        "train": ["--data", tmp_path, "--output", tmp_path / "out"],
        "evaluate": ["--checkpoint", "x.pt", "--data", tmp_path, "--output-json", tmp_path / "e.json"],
        "highres": ["--checkpoint", "x.pt", "--data", tmp_path, "--output-json", tmp_path / "h.json"],
    }[component]
    line = error_line(run(component, *common, flag, value), component)
    assert f"argument {flag}: expected " in line and repr(value) in line


def test_train_refuses_kaggle_and_says_to_fetch_first(tmp_path):
    line = error_line(run("train", "--data", "kaggle", "--output", tmp_path), "train")
    assert "components.fetch_data --source kaggle" in line and "pipeline" in line


@pytest.mark.parametrize("component", ["train", "fetch_data"])
def test_an_output_that_is_a_file_is_refused_before_any_work(component, tmp_path, prepared):
    (tmp_path / "taken").write_text("a file")
    data_flag = "--data" if component == "train" else "--source"
    line = error_line(run(component, data_flag, prepared, "--output", tmp_path / "taken"), component)
    assert f"{tmp_path / 'taken'} is a file, not a folder" in line


def test_an_output_that_cannot_be_written_is_refused_before_any_work(prepared):
    read_only = Path("/sys")  # sysfs: not writable, even by root
    if os.access(read_only, os.W_OK) and not _is_unwritable(read_only):
        pytest.skip("no folder here that this user cannot write to")
    line = error_line(run("train", "--data", prepared, "--output", read_only), "train")
    assert "cannot write to /sys" in line


def _is_unwritable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


@pytest.mark.slow
def test_a_text_file_and_a_pickle_of_objects_are_refused_as_checkpoints(tmp_path, prepared):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"model": {}, "config": Path("x")}, tmp_path / "objects.pt")  # unpickling it would run code
    for checkpoint, message in (("notes.pt", "is not a readable checkpoint"), ("objects.pt", "holds objects other")):
        result = run(
            "evaluate", "--checkpoint", tmp_path / checkpoint, "--data", prepared, "--output-json", tmp_path / "e.json"
        )
        assert message in error_line(result, "evaluate")
    assert not (tmp_path / "e.json").exists()


@pytest.mark.slow
def test_a_damaged_last_checkpoint_on_resume_says_what_to_do(tmp_path, prepared):
    output = tmp_path / "run"
    assert run("train", "--data", prepared, "--output", output, "--epochs", "1", "--batch-size", "8").returncode == 0
    last = output / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])  # cut off, as by a full disk without atomic writes
    result = run("train", "--data", prepared, "--output", output, "--resume", "--epochs", "1", "--batch-size", "8")
    line = error_line(result, "train")
    assert f"{last} is not a readable checkpoint" in line and "best.pt beside it" in line


def test_an_unreachable_server_is_one_line(tmp_path, prepared):
    env = child_environment(CLEARML_API_HOST=f"http://127.0.0.1:{closed_port()}")
    env.pop("CLEARML_OFFLINE_MODE")
    line = error_line(run("train", "--data", prepared, "--output", tmp_path, env=env), "train")
    assert "refused the connection" in line


def test_a_damaged_zip_member_is_named_by_fetch_data(tmp_path):
    archive = zip_folder(make_layout(tmp_path / "raw", per_split=(2, 1, 1)), tmp_path / "headgear.zip")
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("train/BERET/001.jpg")
    raw = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 50 : start + 90] = bytes(40)
    archive.write_bytes(raw)
    line = error_line(run("fetch_data", "--source", archive, "--output", tmp_path / "out"), "fetch_data")
    assert "the member train/BERET/001.jpg is damaged" in line


@pytest.mark.slow
def test_a_full_disk_names_the_file_that_could_not_be_written_and_leaves_nothing_half_written(tmp_path, prepared):
    output = tmp_path / "run"
    result = run(
        "train", "--data", prepared, "--output", output, "--epochs", "1", "--batch-size", "8", file_size_limit=30_000
    )
    assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"train: error: could not write {output}/checkpoints/(best|last)\.pt: File too large", last)
    assert not list(output.rglob("*.tmp"))
    session = output / "train.clearml-offline.zip"
    assert not session.exists() or zipfile.is_zipfile(session)


@pytest.mark.slow
@pytest.mark.parametrize("session_on_the_full_disk", [False, True])
def test_a_full_disk_leaves_no_broken_offline_session(tmp_path, prepared, session_on_the_full_disk):
    # A small tmpfs is a real full disk; mounting one needs root, so elsewhere this is skipped.
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60k", "tmpfs", disk], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        cache = (disk if session_on_the_full_disk else tmp_path) / "cache"  # where ClearML writes the session
        env = child_environment(CLEARML_CACHE_DIR=str(cache))
        result = run(
            "train", "--data", prepared, "--output", disk / "run", "--epochs", "1", "--batch-size", "8", env=env
        )
        assert result.returncode == 2
        assert re.fullmatch(
            rf"train: error: could not write {disk}/run/checkpoints/(best|last)\.pt: No space left on device",
            result.stderr.strip().splitlines()[-1],
        )
        if not session_on_the_full_disk:  # then ClearML's own writer threads fail too, with their tracebacks
            assert "Traceback" not in result.stderr
        session = disk / "run" / "train.clearml-offline.zip"
        assert not session.exists() or (session.stat().st_size and zipfile.is_zipfile(session))
        assert not list(disk.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", disk], check=True)


def test_only_the_projects_own_errors_become_one_line():
    parser = cli.Parser("component", None)

    def bug():
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        cli.run(parser, bug)


def run_pipeline(*args):
    return subprocess.run(
        [sys.executable, "pipelines/run_pipeline.py", "--local", *map(str, args)],
        cwd=REPO,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "-1"], "argument --epochs: expected a whole number of 0 or more, got '-1'"),
        (["--finetune-steps", "-3"], "argument --finetune-steps: expected a whole number of 0 or more"),
        (["--highres-size", "0"], "argument --highres-size: expected a whole number of 1 or more"),
        (["--highres-size", "50"], "--highres-size 50 is not a multiple of the patch size 8; e.g. 48 or 56"),
        (["--nodes", "2"], "--nodes 2: the other machines are ClearML agents, so it needs server mode"),
        (["--data", "no-such-archive.zip"], "data source 'no-such-archive.zip' is not a file or folder here"),
        (["--data", "README.md"], "README.md is a file but not a zip archive"),
        (["--data", "{layout}", "--init", "no-such-weights.pt"], "--init no-such-weights.pt: no such file"),
        (["--output", "README.md"], "argument --output: README.md is a file, not a folder"),
    ],
)
def test_the_pipeline_checks_its_inputs_before_the_first_step(tmp_path, args, message):
    import time

    layout = str(make_layout(tmp_path / "data", per_split=(2, 1, 1)))  # where a case needs good data
    started = time.monotonic()
    result = run_pipeline(
        "--output", tmp_path / "run", "--preset", "smoke", *(arg.format(layout=layout) for arg in args)
    )
    assert message in error_line(result, "run_pipeline")
    assert time.monotonic() - started < 30  # no step ran: the attention benchmark alone takes longer
    assert not (tmp_path / "run" / "steps").exists()


def test_an_init_file_that_is_not_weights_is_one_line(tmp_path, prepared):
    (tmp_path / "notes.pt").write_text("not weights")
    result = run("train", "--data", prepared, "--output", tmp_path / "out", "--init", tmp_path / "notes.pt")
    assert "--init " in error_line(result, "train") and "is not a readable checkpoint" in result.stderr


def test_a_csv_that_cannot_be_parsed_is_named(tmp_path):
    folder = make_layout(tmp_path / "raw", per_split=(2, 1, 1), csv_name=None)
    (folder / "notes.csv").write_text("")  # an empty CSV beside the folders, probed for the columns
    result = run("fetch_data", "--source", folder, "--output", tmp_path / "out")
    assert "notes.csv cannot be read as a CSV" in error_line(result, "fetch_data")
