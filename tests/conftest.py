"""Shared fixtures, and the environment every test runs in: a ClearML that never talks to a
server (offline sessions under a scratch folder), no Kaggle or ClearML secrets, and a data
store of its own. The archives the fixtures build come from ``tests/archives.py``."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.archives import make_layout, make_shapes_archive
from tests.repository import REPO

SECRETS = ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "CLEARML_API_HOST")


def pytest_configure(config):
    """Before any test module is imported: ClearML reads its mode and configuration when it is
    imported, so it must not be imported before this."""
    if "clearml" in sys.modules:
        raise pytest.UsageError(
            "clearml was imported before the tests set ClearML offline; nothing may import it first"
        )
    config.saved_environment = dict(os.environ)
    config.scratch = Path(tempfile.mkdtemp(prefix="headgear-tests-"))
    os.environ["CLEARML_OFFLINE_MODE"] = "1"  # tests never reach a server, even where one is configured
    os.environ["CLEARML_CONFIG_FILE"] = str(REPO / "components" / "common" / "clearml-offline.conf")
    os.environ["CLEARML_CACHE_DIR"] = str(config.scratch / "clearml-cache")
    os.environ["HEADGEAR_DATA_STORE"] = str(config.scratch / "store")
    for secret in SECRETS:
        os.environ.pop(secret, None)
    os.environ["KAGGLE_CONFIG_DIR"] = str(config.scratch / "no-kaggle-config")


def pytest_unconfigure(config):
    if hasattr(config, "saved_environment"):
        os.environ.clear()
        os.environ.update(config.saved_environment)
        shutil.rmtree(config.scratch, ignore_errors=True)


@pytest.fixture
def layout(tmp_path) -> Path:
    return make_layout(tmp_path / "headgear")


@pytest.fixture(scope="session")
def shapes_zip(tmp_path_factory) -> Path:
    """The ten shape classes, built once per test session."""
    return make_shapes_archive(tmp_path_factory.mktemp("shapes") / "shapes-headgear-layout.zip")


@pytest.fixture
def fashion_zip() -> Path:
    """The 3,600-image Fashion-MNIST stand-in, which is not part of the repository: the tests
    that make a claim only that many images support run when HEADGEAR_FASHION_ZIP names it."""
    named = os.environ.get("HEADGEAR_FASHION_ZIP")
    if not named:
        pytest.skip("opt-in: set HEADGEAR_FASHION_ZIP=<the Fashion-MNIST archive in the headgear layout>")
    if not Path(named).is_file():
        pytest.skip(f"HEADGEAR_FASHION_ZIP={named} is not a file")
    return Path(named)


@pytest.fixture(scope="session")
def smoke_run(shapes_zip, tmp_path_factory) -> dict:
    """The smoke preset trained once on the shape classes, shared by the tests that need a
    trained checkpoint."""
    from components.train import train

    return train(str(shapes_zip), "smoke", tmp_path_factory.mktemp("smoke"))
