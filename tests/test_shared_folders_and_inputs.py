"""Folders two runs can share, inputs read as they were written, and refusals that come at once:
a run folder belongs to one run at a time and a finished run is not overwritten unless asked;
temporary files a killed write left are removed; the data store takes concurrent preparations;
a zip storing one name twice, a CSV with its columns in any order; an image size the patch does
not divide, unusable initial weights and missing Kaggle credentials refused before any work."""

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from components.common import checkpoints
from components.common.data import prepare
from components.common.errors import ConfigError, DataError
from components.common.tracking import child_environment
from tests.archives import CLASSES, make_layout, zip_folder
from tests.repository import REPO
from tests.test_bad_input import error_line, run


def start(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=child_environment(PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("shared")
    return str(prepare(make_layout(root / "raw", per_split=(64, 4, 4)), root / "store").root)


# --- a run folder belongs to one run --------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path, data):
    first = start("-m", "components.train", "--data", data, "--output", str(tmp_path), "--epochs", "300")
    try:
        wait_for(tmp_path / ".lock")
        time.sleep(1)  # the holder has written its name into it
        second = run("train", "--data", data, "--output", tmp_path, "--epochs", "1")
        line = error_line(second, "train")
        assert f"{tmp_path} is in use by process {first.pid}" in line and "another --output" in line
        resumed = run("train", "--data", data, "--output", tmp_path, "--epochs", "1", "--resume")
        assert f"is in use by process {first.pid}" in error_line(resumed, "train")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_a_killed_run_leaves_no_claim_behind(tmp_path):
    from components.common.run_folder import claimed

    hold = "import sys, time; from pathlib import Path; from components.common.run_folder import claimed\n" \
        "with claimed(Path(sys.argv[1])):\n    time.sleep(600)"  # fmt: skip
    holder = start("-c", hold, str(tmp_path))
    wait_for(tmp_path / ".lock")
    time.sleep(1)
    with pytest.raises(ConfigError, match=f"in use by process {holder.pid}"):
        with claimed(tmp_path):
            pass
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    with claimed(tmp_path) as folder:  # the kernel let go of the lock with the process
        assert folder == tmp_path


def test_a_process_the_run_forked_does_not_keep_its_claim(tmp_path):
    from components.common.run_folder import claimed

    # ClearML's reporter is such a process: forked while the folder is held, it can outlive the run.
    fork = "import os, sys, time; from pathlib import Path; from components.common.run_folder import claimed\n" \
        "with claimed(Path(sys.argv[1])):\n    if os.fork() == 0:\n        time.sleep(600)\n" \
        "    else:\n        print('forked', flush=True)"  # fmt: skip
    run = start("-c", fork, str(tmp_path))
    try:
        assert run.stdout.readline().strip() == "forked"
        run.wait(timeout=60)
        with claimed(tmp_path) as folder:  # the run has ended; its forked child still lives
            assert folder == tmp_path
    finally:
        os.killpg(run.pid, signal.SIGKILL)


def test_overwrite_removes_the_earlier_runs_outputs_and_nothing_else(tmp_path, capsys):
    from components.common.run_folder import claimed

    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "train.json").write_text("{}")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("the user's own")
    with claimed(tmp_path, tmp_path / "steps", True, outputs=("steps", "train", "summary.json")):
        assert not (tmp_path / "steps").exists() and not (tmp_path / "summary.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "the user's own"
    assert "removed the earlier run's steps, summary.json" in capsys.readouterr().out


@pytest.mark.slow
def test_a_finished_training_run_is_not_overwritten_unless_asked(tmp_path, data):
    assert run("train", "--data", data, "--output", tmp_path, "--epochs", "1").returncode == 0
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    again = run("train", "--data", data, "--output", tmp_path, "--epochs", "1")
    line = error_line(again, "train")
    assert "holds an earlier run (checkpoints/last.pt)" in line and "--resume" in line and "--overwrite" in line
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    both = run("train", "--data", data, "--output", tmp_path, "--resume", "--overwrite")
    assert "argument --overwrite: not allowed with argument --resume" in error_line(both, "train")
    anew = run("train", "--data", data, "--output", tmp_path, "--epochs", "1", "--overwrite")
    assert anew.returncode == 0 and "removed the earlier run's checkpoints, train.json" in anew.stdout


def test_a_run_folder_of_the_pipeline_is_not_run_into_twice(tmp_path):
    (tmp_path / "run" / "steps").mkdir(parents=True)  # what a run leaves first
    layout = make_layout(tmp_path / "data", per_split=(4, 2, 2))
    command = [sys.executable, "pipelines/run_pipeline.py", "--local", "--data", str(layout), "--preset", "smoke"]
    refused = subprocess.run(
        [*command, "--output", str(tmp_path / "run")], cwd=REPO, env=child_environment(), capture_output=True, text=True
    )
    assert (
        refused.returncode == 2 and "holds an earlier run (steps)" in refused.stderr and "--overwrite" in refused.stderr
    )


def test_temporary_files_a_killed_write_left_are_removed_when_the_folder_is_claimed(tmp_path, capsys):
    from components.common.run_folder import claimed

    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".last.pt.abc123.headgear.tmp"
    stale.write_bytes(b"half a checkpoint")
    foreign = tmp_path / ".another-program.tmp"  # not the project's: left alone
    foreign.write_text("")
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / ".lock").touch()  # a folder claimed on its own: its own runs clean it
    other = tmp_path / "evaluate" / ".evaluate.json.x1.headgear.tmp"
    other.write_text("{")
    kept = tmp_path / "checkpoints" / "best.pt"
    kept.write_bytes(b"weights")
    with claimed(tmp_path):
        pass
    assert not stale.exists() and other.exists() and kept.exists() and foreign.exists()
    assert "removed 1 temporary files that a killed write left" in capsys.readouterr().out


# --- the data store ---------------------------------------------------------------------------


def test_preparations_of_the_same_data_into_one_store_at_once_all_end_with_it(tmp_path):
    # Four at once, twice: with one copy in progress per version, as before, 4 of 5 such
    # rounds failed here (a run renamed or removed another's copy while it was being written).
    layout = make_layout(tmp_path / "raw", per_split=(300, 4, 4))
    code = "import sys; from pathlib import Path; from components.common.data import prepare; " \
        "print(prepare(Path(sys.argv[1]), Path(sys.argv[2])).root)"  # fmt: skip
    for store in (tmp_path / "store-1", tmp_path / "store-2"):
        runs = [start("-c", code, str(layout), str(store)) for _ in range(4)]
        outputs = [process.communicate(timeout=300) for process in runs]
        assert [process.returncode for process in runs] == [0] * 4, outputs
        assert len({stdout.strip() for stdout, _ in outputs}) == 1
        assert not list(store.glob(".*.partial"))  # no copy left half-way


def test_a_copy_a_killed_preparation_left_in_the_store_is_removed(tmp_path):
    layout = make_layout(tmp_path / "raw", per_split=(4, 2, 2))
    version = prepare(layout, tmp_path / "first").version
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "store" / f".{version}.{dead.stdout.strip()}.partial"
    (stale / "train").mkdir(parents=True)
    assert prepare(layout, tmp_path / "store").version == version
    assert not stale.exists()


# --- archives and CSVs read as written ------------------------------------------------------------


def test_a_zip_storing_one_name_twice_is_refused_when_the_two_differ(tmp_path):
    archive = zip_folder(make_layout(tmp_path / "data", per_split=(3, 2, 2)), tmp_path / "headgear.zip")
    with zipfile.ZipFile(archive, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("train/BERET/001.jpg", b"another file under the same name")
    with pytest.raises(DataError, match="different files under one name, train/BERET/001.jpg"):
        prepare(archive, tmp_path / "store")


def test_a_zip_storing_one_path_under_two_spellings_is_refused_when_the_two_differ(tmp_path):
    archive = zip_folder(make_layout(tmp_path / "data", per_split=(3, 2, 2)), tmp_path / "headgear.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("./train//BERET/001.jpg", b"another file extracted to the same place")
    with pytest.raises(DataError, match="different files under one name, train/BERET/001.jpg"):
        prepare(archive, tmp_path / "store")


def test_a_zip_storing_one_file_twice_is_read_once_with_a_note(tmp_path):
    folder = make_layout(tmp_path / "data", per_split=(3, 2, 2))
    archive = zip_folder(folder, tmp_path / "headgear.zip")
    with zipfile.ZipFile(archive, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.write(folder / "train" / "BERET" / "001.jpg", "train/BERET/001.jpg")
    data = prepare(archive, tmp_path / "store")
    assert len(data.split("train")) == 3 * 3
    assert any("stores 1 members twice" in note and "train/BERET/001.jpg" in note for note in data.manifest["notes"])


def test_a_csv_with_its_columns_in_another_order_and_more_of_them_is_the_listing(tmp_path):
    folder = make_layout(tmp_path / "data", per_split=(3, 2, 2), csv_name=None)
    keep = [f"{split}/{label}/001.jpg" for split in ("train", "valid", "test") for label in CLASSES]
    keep.append("train/ZUCCHETTO/002.jpg")
    rows = ["notes,data set,labels,filepaths,class id"]
    rows += [f"x,{path.split('/')[0]},{path.split('/')[1]},{path},{CLASSES.index(path.split('/')[1])}" for path in keep]
    (folder / "listing.csv").write_text("\n".join(rows) + "\n")
    data = prepare(folder, tmp_path / "store")
    assert sorted(data.index["filepaths"]) == sorted(keep)  # the CSV's selection, not the folders'
    assert any("columns ignored: notes" in note for note in data.manifest["notes"])


def test_a_csv_with_some_of_the_columns_beside_the_listing_is_not_taken_for_it(tmp_path):
    folder = make_layout(tmp_path / "data", per_split=(3, 2, 2), csv_name=None)
    (folder / "a-class-map.csv").write_text("class id,labels\n0,BASEBALL CAP\n")
    splits = ("train", "valid", "test")
    rows = [f"{CLASSES.index(label)},{split}/{label}/001.jpg,{label},{split}" for split in splits for label in CLASSES]
    (folder / "listing.csv").write_text("class id,filepaths,labels,data set\n" + "\n".join(rows) + "\n")
    assert len(prepare(folder, tmp_path / "store").index) == 9


def test_two_csvs_that_both_list_images_are_refused_naming_both(tmp_path):
    folder = make_layout(tmp_path / "data", per_split=(3, 2, 2), csv_name=None)
    listing = "class id,filepaths,labels,data set\n0,train/BASEBALL CAP/001.jpg,BASEBALL CAP,train\n"
    for name in ("train.csv", "test.csv"):
        (folder / name).write_text(listing)
    with pytest.raises(DataError, match=r"several CSVs that list images \(test.csv, train.csv\); keep one"):
        prepare(folder, tmp_path / "store")


def test_a_csv_with_some_of_the_columns_says_which_are_missing(tmp_path):
    folder = make_layout(tmp_path / "data", per_split=(3, 2, 2), csv_name=None)
    (folder / "listing.csv").write_text("filepaths,labels\ntrain/BERET/001.jpg,BERET\n")
    with pytest.raises(DataError, match=r"listing.csv lists images but lacks the columns \['class id', 'data set'\]"):
        prepare(folder, tmp_path / "store")


# --- refused at once, in one line ------------------------------------------------------------------


@pytest.mark.slow
def test_an_image_size_the_patch_does_not_divide_is_refused_before_the_data_is_read(tmp_path, smoke_run):
    checkpoint = smoke_run["checkpoint"]  # the smoke model cuts 8x8 patches
    missing = tmp_path / "no-such-data.zip"  # so that reading the data would fail differently
    cases = {
        "train": ["--output", tmp_path / "t", "--image-size", "30"],
        "evaluate": ["--checkpoint", checkpoint, "--output-json", tmp_path / "e.json", "--image-size", "50"],
        "highres": ["--checkpoint", checkpoint, "--output-json", tmp_path / "h.json", "--image-size", "60"],
    }
    for component, args in cases.items():
        line = error_line(run(component, "--data", missing, *args), component)
        assert "is not a multiple of the patch size 8" in line, line


@pytest.mark.slow
def test_initial_weights_from_timm_without_the_hub_are_refused_at_once(tmp_path, data):
    # No internet here: the Hub's address does not resolve, as on a machine offline.
    result = run(
        "train", "--data", data, "--output", tmp_path, "--init", "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    )
    line = error_line(result, "train")
    assert "the Hugging Face Hub did not answer" in line and "pass the file" in line
    assert "Retrying" not in result.stderr + result.stdout  # one look, no retries


def test_timm_weights_are_looked_for_where_timm_keeps_them_on_the_hub():
    from components.common.init_weights import _hub_repository

    # timm's own registry is the reference: a name without a tag takes timm's default tag
    assert _hub_repository("timm:vit_tiny_patch16_224") == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert _hub_repository("timm:vit_small_patch16_224.augreg_in1k") == "timm/vit_small_patch16_224.augreg_in1k"


def test_the_pipeline_checks_timm_weights_and_kaggle_credentials_before_the_first_step(tmp_path):
    layout = make_layout(tmp_path / "data", per_split=(4, 2, 2))
    command = [sys.executable, "pipelines/run_pipeline.py", "--local", "--preset", "smoke"]
    cases = {
        "the Hugging Face Hub did not answer": ["--data", str(layout), "--init", "timm:vit_tiny_patch16_224"],
        "no Kaggle credentials found": ["--data", "kaggle"],  # and the advice names the pipeline's --data
    }
    for expected, args in cases.items():
        output = tmp_path / expected.split()[-1]
        result = subprocess.run(
            [*command, *args, "--output", str(output)],
            cwd=REPO,
            env=child_environment(),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1 and not (output / "steps").exists()
    assert "(--data PATH.zip)" in result.stderr


@pytest.mark.slow
def test_a_damaged_file_given_to_init_gets_advice_for_init(tmp_path, data):
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, legacy, _use_new_zipfile_serialization=False)
    line = error_line(run("train", "--data", data, "--output", tmp_path / "run", "--init", legacy), "train")
    assert "--init" in line and "timm state dict" in line and "last.pt" not in line and "--resume" not in line


@pytest.mark.slow
def test_ctrl_c_of_a_local_run_returns_within_seconds_saying_what_is_kept(tmp_path, data):
    run_dir = tmp_path / "run"
    command = ["pipelines/run_pipeline.py", "--local", "--data", data, "--preset", "smoke", "--epochs", "400"]
    pipeline = start(*command, "--benchmark", "quick", "--output", str(run_dir))
    wait_for(run_dir / "steps" / "train.log")
    time.sleep(5)  # well into training
    os.killpg(pipeline.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
    stopped = time.monotonic()
    _, stderr = pipeline.communicate(timeout=60)
    assert time.monotonic() - stopped < 5  # was 7.5 to 11 s: the step had its whole shutdown
    assert pipeline.returncode == 130
    assert "interrupted: train is stopped; the steps that finished (fetch_data) are kept in" in stderr
    assert (run_dir / "fetch_data" / "fetch_data.json").is_file()
    last = run_dir / "train" / "checkpoints" / checkpoints.LAST
    assert not last.exists() or checkpoints.is_checkpoint(checkpoints.read_weights(last))  # never half-written
