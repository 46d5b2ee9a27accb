"""The ClearML mode decision: a configured but unreachable server is reported within seconds,
never waited on for minutes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.common.errors import TrackingError
from components.common.tracking import check_server, open_task, server_configured
from tests.ports import closed_port
from tests.repository import REPO


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers (a hung server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_offline_unless_a_server_is_configured(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "absent.conf"))
    monkeypatch.delenv("CLEARML_OFFLINE_MODE")
    monkeypatch.delenv("CLEARML_API_HOST", raising=False)
    assert not server_configured()
    monkeypatch.setenv("CLEARML_API_HOST", "http://127.0.0.1:8008")
    assert server_configured()
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")  # what --local sets
    assert not server_configured()


def test_a_server_that_does_not_answer_is_reported_within_seconds(monkeypatch, silent_server, tmp_path):
    monkeypatch.delenv("CLEARML_OFFLINE_MODE")
    monkeypatch.setenv("CLEARML_API_HOST", silent_server)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"ClearML server at {silent_server} did not answer within 1 s.*--local"):
        check_server(timeout_s=1)
    assert time.monotonic() - started < 10


def test_open_task_refuses_an_unreachable_server_before_clearml_retries(monkeypatch, tmp_path):
    port = closed_port()
    monkeypatch.delenv("CLEARML_OFFLINE_MODE")
    monkeypatch.setenv("CLEARML_API_HOST", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"127.0.0.1:{port} refused the connection.*--local"):
        with open_task("probe", "testing", tmp_path):
            pass
    assert time.monotonic() - started < 15


def test_an_offline_task_leaves_its_session_beside_the_outputs(tmp_path):
    from tests.sessions import read_session, scalars

    with open_task("probe", "testing", tmp_path, title="probe run") as tracker:
        tracker.connect({"lr": 0.1})
        for step in range(3):
            tracker.scalar("loss", "train", 1.0 / (step + 1), step)
    assert tracker.session == str(tmp_path / "probe.clearml-offline.zip")
    session = read_session(tracker.session)
    assert session["task"]["name"] == "probe run"
    assert scalars(session, "loss", "train") == [1.0, 0.5, 1 / 3]


def test_a_component_reports_into_the_running_task_and_leaves_it_open(tmp_path):
    # What a pipeline step's generated script does on an agent: its Task.init made the task,
    # the component runs inside it, then the script uploads the step's return values, which a
    # task closed by the component would drop.
    from clearml import Task

    from tests.sessions import read_session

    step = Task.init(project_name="tests", task_name="step", auto_connect_frameworks=False)
    with open_task("probe", "testing", tmp_path / "component") as tracker:
        assert tracker.task is step and tracker.reused
        tracker.artifact("inside", {"a": 1})
    step.upload_artifact("returned", artifact_object={"b": 2}, wait_on_upload=True)  # after the component
    step_id = step.id
    step.close()

    from clearml.config import get_offline_dir

    session = read_session(Path(get_offline_dir(task_id=step_id)).with_suffix(".zip"))
    stored = [name for name in session["files"] if "/artifacts/" in name or name.startswith("artifacts")]
    assert any("inside" in name for name in stored) and any("returned" in name for name in stored), session["files"]
    assert not list((tmp_path / "component").glob("*.zip"))  # not the component's session to keep


MODEL_ERRORS = """
import sys
from clearml.backend_api.session.client import APIClient
from components.common import checkpoints
from components.common.errors import TrackingError

client = APIClient()
no_weights = client.models.create(name="registered without weights", uri="").id
lost = client.models.create(name="weights lost", uri=sys.argv[1] + "/nowhere/best.pt").id
for model_id in ("0123456789abcdef0123456789abcdef", no_weights, lost):
    try:
        checkpoints.local_copy(model_id)
    except TrackingError as error:
        print("refused:", error)
"""


def test_a_model_unknown_to_the_server_without_weights_or_lost_is_a_clear_error(tmp_path):
    # The real SDK against the server stand-in (tests/clearml_server.py), in a process of its
    # own: this one runs ClearML offline.
    from tests.clearml_server import ClearMLStandIn

    with ClearMLStandIn(tmp_path / "server") as server:
        run = subprocess.run(
            [sys.executable, "-c", MODEL_ERRORS, server.files_host],
            cwd=REPO, env=server.client_environment(tmp_path / "home"), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    errors = [line for line in run.stdout.splitlines() if line.startswith("refused: ")]
    reasons = ("the server knows no model of that id", "it has no weights file", "failed downloading")
    assert len(errors) == len(reasons), run.stdout + run.stderr[-2000:]
    for error, reason in zip(errors, reasons):
        assert "could be downloaded" in error and reason in error, error
