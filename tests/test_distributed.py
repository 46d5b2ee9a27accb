"""Data-parallel training on the CPU: 2 ranks, gloo, the real torchrun and the real launcher.

Every run is a `components.train` command in a process of its own, as a user starts it: the
single process, ``torchrun --nproc_per_node 2 -m components.train`` and ``--ranks 2``. The
smoke preset has no batch-level randomness (no dropout, no drop path, no mixup or cutmix), so
2 ranks of 32 images must train what one process of 64 does.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from components.common import checkpoints
from components.common.tracking import child_environment
from tests.repository import REPO
from tests.sessions import read_session, scalars

pytestmark = pytest.mark.slow  # each test trains in processes of its own, tens of seconds

EPOCHS = 3
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TRAIN = ["-m", "components.train", "--preset", "smoke", "--device", "cpu"]


def command(data: Path, output: Path, *extra, launcher=(sys.executable,)) -> list[str]:
    return [*launcher, *TRAIN, "--data", str(data), "--output", str(output), *map(str, extra)]


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = child_environment(OMP_NUM_THREADS="1")  # a core per rank on 2 cores, as torchrun sets it
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(shapes_zip, tmp_path_factory) -> dict:
    """The same training (smoke, 3 epochs, global batch 64) as one process and as 2 ranks."""
    root = tmp_path_factory.mktemp("distributed")
    done = {}
    for name, launcher in (("single", (sys.executable,)), ("torchrun", TORCHRUN)):
        output = root / name
        result = run(command(shapes_zip, output, "--epochs", EPOCHS, launcher=launcher))
        assert result.returncode == 0, result.stderr[-3000:]
        trained = json.loads((output / "train.json").read_text())
        done[name] = {"output": output, "stdout": result.stdout, "train": trained}
    return done


def test_two_ranks_train_what_one_process_of_the_same_global_batch_does(runs):
    single, ranks = runs["single"]["train"], runs["torchrun"]["train"]
    assert ranks["train_loss"] == pytest.approx(single["train_loss"], rel=1e-3)
    assert ranks["val_accuracy"] == single["val_accuracy"]
    assert ranks["config"]["batch_size"] == single["config"]["batch_size"] == 64  # the global batch


def test_train_json_records_the_ranks(runs):
    assert runs["single"]["train"]["world_size"] == 1
    assert runs["torchrun"]["train"]["world_size"] == 2


def test_rank_0_alone_writes_and_reports(runs):
    output = runs["torchrun"]["output"]
    written = {path.relative_to(output).as_posix() for path in output.rglob("*")}
    assert written == {
        ".lock",
        "checkpoints",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "curves.png",
        "train.json",
        "train.clearml-offline.zip",
    }
    stdout = runs["torchrun"]["stdout"]
    assert stdout.count("ClearML Task: created new task") == 1  # one task, rank 0's
    assert stdout.count(f"epoch {EPOCHS}/{EPOCHS}: train loss") == 1  # one line per validation
    session = read_session(output / "train.clearml-offline.zip")
    assert len(scalars(session, "accuracy", "valid")) == EPOCHS  # the whole job's, reported once


def rank_1_of_2(launcher: int, output: Path) -> int:
    """The process that `launch` started as rank 1: of the two it spawned, the one that does not
    hold the run folder (rank 0 does, and its lock file names it). Their environment is set after
    they start, so /proc does not show their ranks."""
    writer = int((output / ".lock").read_text().split()[1])
    spawned = [child.pid for child in psutil.Process(launcher).children() if "spawn_main" in " ".join(child.cmdline())]
    assert writer in spawned and len(spawned) == 2, (writer, spawned)
    return next(pid for pid in spawned if pid != writer)


def test_a_killed_rank_ends_the_job_in_seconds_and_resume_goes_on_exactly(shapes_zip, tmp_path):
    settings = ("--epochs", 30, "--checkpoint-minutes", 0)  # a checkpoint after every epoch
    uninterrupted = run(command(shapes_zip, tmp_path / "uninterrupted", *settings, launcher=TORCHRUN))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    killed = tmp_path / "killed"
    job = subprocess.Popen(
        command(shapes_zip, killed, *settings, "--ranks", 2),
        cwd=REPO,
        env=child_environment(OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = killed / "checkpoints" / checkpoints.LAST
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    psutil.Process(rank_1_of_2(job.pid, killed)).send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 2
    assert time.monotonic() - killed_at < 10
    said = [line for line in stderr.splitlines() if line.startswith("train: error:")]
    assert said == [
        "train: error: rank 1 of 2 failed (ended by SIGKILL), so the job stopped; fix that and run again, or "
        "--resume from the last checkpoint"
    ]
    assert not list(killed.rglob("*.headgear.tmp"))  # nothing half-written
    epoch = checkpoints.load(last)["epoch"]
    assert epoch < 29

    resumed = run(command(shapes_zip, killed, *settings, "--ranks", 2, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {last} after epoch {epoch + 1}" in resumed.stdout
    expected = json.loads((tmp_path / "uninterrupted" / "train.json").read_text())
    got = json.loads((killed / "train.json").read_text())
    assert got["train_loss"] == expected["train_loss"] and got["val_accuracy"] == expected["val_accuracy"]
    for name in (checkpoints.BEST, checkpoints.LAST):
        ours = torch.load(killed / "checkpoints" / name, weights_only=True)["model"]
        theirs = torch.load(tmp_path / "uninterrupted" / "checkpoints" / name, weights_only=True)["model"]
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


# components.train on a clock the test sets, one per rank: 5 s of setup, then 10 s an epoch; on
# rank 0 20 s from the fifth epoch on.
CLOCKED_TRAIN = """
import itertools, os, sys
import psutil
from components.common.loop import TimeBudget
from components.train import main
slow_from = 4 if os.environ["RANK"] == "0" else 10**6
epochs = (20 if n >= slow_from else 10 for n in itertools.count())
readings = itertools.accumulate(itertools.chain([psutil.Process().create_time() + 5], epochs))
TimeBudget.clock = staticmethod(lambda: next(readings))
main(sys.argv[1:])
"""


def test_under_a_time_budget_every_rank_trains_the_schedule_rank_0_decided(shapes_zip, tmp_path):
    # Fitted to 8 epochs of a 100 s budget after the first; rank 0's epochs then slow down, so
    # it stops the job after the sixth, while rank 1's clock would train on: a rank that decided
    # for itself would go on alone (the job hangs, or fails).
    script = tmp_path / "clocked_train.py"
    script.write_text(CLOCKED_TRAIN)
    budget = ("--epochs", 20, "--time-budget", 100, "--batch-size", 256, "--checkpoint-minutes", 0)  # 2 steps an epoch
    args = [*TORCHRUN, str(script), *command(shapes_zip, tmp_path / "run", *budget, launcher=())[2:]]
    env = child_environment(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((tmp_path / "run" / "train.json").read_text())
    assert trained["time_budget"]["fitted"] == 8 and trained["time_budget"]["epochs"] == 6
    assert trained["epochs"] == list(range(1, 7))
    assert result.stdout.count("time budget 100 s: stopping after epoch 6 of 8, as the next would end past it") == 1


def test_a_batch_the_ranks_cannot_share_is_refused_in_one_line(shapes_zip, tmp_path):
    result = run(command(shapes_zip, tmp_path / "run", "--batch-size", 63, "--ranks", 2))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "train: error: --batch-size 63 is the global batch and 2 ranks cannot share it equally; "
        "pass a multiple of 2, e.g. 62 or 64"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_rank_that_fails_names_itself_and_stops_the_job(shapes_zip, tmp_path):
    (tmp_path / "run").mkdir()
    shutil.copy(shapes_zip, tmp_path / "data.zip")
    result = run(command(tmp_path / "data.zip", tmp_path / "run", "--epochs", 1, launcher=TORCHRUN))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = run(command(tmp_path / "data.zip", tmp_path / "run", "--epochs", 2, "--resume", "--ranks", 2))
    assert resumed.returncode == 2
    # every rank refuses the other settings; the launcher names the first that ended
    said = [line for line in resumed.stderr.splitlines() if "error:" in line]
    assert len(said) == 1 and said[0].startswith("train: error: rank ")
    assert "of 2 failed (--resume: " in said[0] and "was trained with other settings" in said[0]
    assert "Traceback" not in resumed.stderr
