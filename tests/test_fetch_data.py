"""fetch_data: Kaggle (its network call mocked: Kaggle cannot be reached here), local
sources, the ClearML offline session it leaves, and no secret in it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import requests
from kaggle.api.kaggle_api_extended import KaggleApi

from components.common.errors import DataError
from components.common.tracking import child_environment
from components.fetch_data import KAGGLE_DATASET, fetch_data
from tests.archives import make_layout, zip_folder
from tests.repository import REPO
from tests.sessions import read_session

SECRET = "s3cr3t-kaggle-key-5f2a"


@pytest.fixture
def no_kaggle_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "empty"))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_missing_kaggle_credentials_fail_fast_and_say_what_to_set(no_kaggle_credentials, tmp_path):
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "components.fetch_data", "--source", "kaggle", "--output", str(tmp_path / "out")],
        cwd=REPO,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert time.monotonic() - started < 30
    assert "no Kaggle credentials found" in run.stderr
    assert "KAGGLE_USERNAME and KAGGLE_KEY" in run.stderr and "--source PATH.zip" in run.stderr


def test_kaggle_download_is_validated_registered_and_keeps_secrets_out(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    archive = zip_folder(layout, tmp_path / "headgear-image-classification.zip")
    calls = []

    def fake_download(api, dataset, path=None, unzip=False, **kwargs):  # the network call, mocked
        calls.append((dataset, unzip))
        shutil.copy(archive, f"{path}/headgear-image-classification.zip")

    monkeypatch.setattr(KaggleApi, "dataset_download_files", fake_download)
    result = fetch_data("kaggle", tmp_path / "out")
    assert calls == [(KAGGLE_DATASET, False)]
    assert result["counts"] == {"train": 24, "valid": 9, "test": 9}
    assert result["data"] == result["path"]  # offline: the local version stands for the dataset
    assert (tmp_path / "out" / result["version"] / "manifest.json").is_file()
    assert json.loads((tmp_path / "out" / "fetch_data.json").read_text())["version"] == result["version"]

    session = read_session(result["clearml"])
    reported = {(event["type"], event["metric"]) for event in session["events"]}
    assert {("plot", "class counts"), ("training_debug_image", "class counts")} <= reported  # table, figure
    assert any(name.endswith("artifacts/manifest/manifest.json") for name in session["files"])
    assert session["task"]["hyperparams"]["General"]["source"]["value"] == "kaggle"
    every_output = "".join(p.read_text("utf-8", "replace") for p in (tmp_path / "out").rglob("*.json"))
    assert SECRET not in session["text"] and SECRET not in every_output


def test_no_network_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)

    def unreachable(*args, **kwargs):  # what the kaggle package raises offline, mocked
        raise requests.exceptions.ConnectionError("Failed to resolve 'www.kaggle.com'")

    monkeypatch.setattr(KaggleApi, "dataset_download_files", unreachable)
    with pytest.raises(DataError, match="could not download .*check the network.*--source PATH.zip"):
        fetch_data("kaggle", tmp_path / "out")


def test_a_local_folder_source_and_a_bad_one(layout, tmp_path):
    result = fetch_data(str(layout), tmp_path / "out")
    assert result["classes"] == ["BASEBALL CAP", "BERET", "ZUCCHETTO"]
    with pytest.raises(DataError, match="not a file or folder|neither a zip"):
        fetch_data(str(tmp_path / "missing.zip"), tmp_path / "out2")


REGISTER = """
import json, sys
from pathlib import Path
from clearml import Dataset, Task
from components.common.data import prepare
from components.common.tracking import DATASET_PROJECT, register_dataset

data, other = (prepare(Path(folder), Path(sys.argv[3])) for folder in sys.argv[1:3])
tags = [f"sha:{data.version}"]
archived = Dataset.create(dataset_name="headgear", dataset_project=DATASET_PROJECT, dataset_tags=tags)
archived.finalize()
Task.get_task(task_id=archived.id).set_archived(True)
cut_short = Dataset.create(dataset_name="headgear", dataset_project=DATASET_PROJECT, dataset_tags=tags)
Task.get_task(task_id=cut_short.id).mark_stopped(force=True)  # an upload that never finished
first = register_dataset(data, output_uri=sys.argv[4])
again = register_dataset(data)
derived = register_dataset(other, parent=first)
print(json.dumps({"archived": archived.id, "cut_short": cut_short.id, "first": first, "again": again,
                  "derived": derived, "derived_parents": Dataset.get(dataset_id=derived).get_dependency_graph()}))
"""


def test_with_a_server_each_content_hash_is_registered_once_and_only_a_finished_dataset_is_reused(layout, tmp_path):
    # The real SDK against the server stand-in (tests/clearml_server.py), in a process of its
    # own: this one runs ClearML offline.
    from tests.clearml_server import ClearMLStandIn

    other = make_layout(tmp_path / "other", per_split=(4, 2, 2))
    with ClearMLStandIn(tmp_path / "server") as server:
        destination = f"{server.files_host}/elsewhere"
        run = subprocess.run(
            [sys.executable, "-c", REGISTER, str(layout), str(other), str(tmp_path / "store"), destination],
            cwd=REPO, env=server.client_environment(tmp_path / "home"), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        ids = json.loads(run.stdout.strip().splitlines()[-1])
        tasks = server.api.tasks
    assert ids["first"] not in (ids["archived"], ids["cut_short"])  # neither an archived nor an unfinished one
    assert ids["again"] == ids["first"] and ids["derived"] != ids["first"]
    assert ids["derived_parents"][ids["derived"]] == [ids["first"]]
    uploaded = [a["uri"] for a in tasks[ids["first"]]["execution"]["artifacts"]]
    assert uploaded and all(uri.startswith(f"{destination}/") for uri in uploaded)
