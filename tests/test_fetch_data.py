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

from components.data import DataError
from components.fetch_data import KAGGLE_DATASET, fetch_data
from components.tracking import child_environment
from tests.conftest import REPO, zip_folder
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
    assert result["dataset_id"] is None  # offline: the local path and hash stand for the dataset
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


def test_with_a_server_each_content_hash_is_registered_once(layout, tmp_path, monkeypatch):
    # No ClearML server can run here: its Dataset API is replaced by an in-memory registry.
    from clearml import Dataset

    from components.data import prepare
    from components.tracking import DATASET_PROJECT, register_dataset
    from tests.conftest import make_layout

    registry = []

    class ServerDataset:
        def __init__(self, project, tags, parents):
            self.id, self.project, self.tags, self.files = f"dataset-{len(registry)}", project, tags, []
            self.parents = parents

        def sync_folder(self, local_path):
            self.files.append(local_path)

        def upload(self, show_progress=True):
            pass

        def finalize(self):
            registry.append(self)

    def create(dataset_name, dataset_project, dataset_tags, parent_datasets):
        return ServerDataset(dataset_project, dataset_tags, parent_datasets)

    def list_datasets(dataset_project, tags, only_completed):
        return [{"id": d.id} for d in registry if d.project == dataset_project and d.tags == tags]

    monkeypatch.setattr(Dataset, "create", staticmethod(create))
    monkeypatch.setattr(Dataset, "list_datasets", staticmethod(list_datasets))
    data = prepare(layout, tmp_path / "store")
    assert register_dataset(data) == register_dataset(data) == "dataset-0"
    assert len(registry) == 1 and registry[0].files == [str(data.root)] and registry[0].project == DATASET_PROJECT
    other = prepare(make_layout(tmp_path / "other", per_split=(4, 2, 2)), tmp_path / "store")
    assert register_dataset(other) == "dataset-1" and registry[1].parents is None
    third = prepare(make_layout(tmp_path / "third", per_split=(3, 1, 1)), tmp_path / "store")
    assert register_dataset(third, parent="raw-upload") == "dataset-2" and registry[2].parents == ["raw-upload"]
