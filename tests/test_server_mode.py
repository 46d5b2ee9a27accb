"""Server mode end to end: the real ``run_pipeline.py``, the real ``PipelineController`` and a
real ``clearml-agent daemon`` against a ClearML server stand-in (tests/clearml_server.py).

What runs for real: the launcher builds and starts the controller on this machine (or enqueues
it for an agent), agents take the steps from their queues, clone the repository from a
``file://`` URL of a fresh commit of this working tree, run each generated step script at the
clone's root with the environment of ``docker/Dockerfile`` (the image's python replaced by this
one), upload models, artifacts and Datasets to the stand-in's file server and hand each other
ids. What is stood in for: the ClearML server itself (an in-memory HTTP stand-in, see its
docstring for what it cannot show) and Docker (the agents run without it).
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.dag import DAG
from tests.archives import CLASSES, make_layout
from tests.clearml_server import ClearMLStandIn, last_metrics
from tests.repository import REPO

pytestmark = pytest.mark.slow
STEPS = list(DAG)
FINISHED = ("completed", "failed", "stopped", "closed", "published")


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def snapshot_of_the_working_tree(folder: Path) -> tuple[Path, str]:
    """A fresh repository holding this working tree as one commit (uncommitted changes
    included), whose ``origin`` is its own plain path, as a local checkout's can be."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    git("init", "-q", "-b", "main", cwd=folder)
    git("add", "-A", cwd=folder)
    git("-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "snapshot", cwd=folder)
    git("remote", "add", "origin", str(folder), cwd=folder)
    return folder, git("rev-parse", "HEAD", cwd=folder)


def image_environment() -> dict[str, str]:
    """The ``ENV`` of docker/Dockerfile, the image's python replaced by this one."""
    text = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
    return {key: value.replace("/opt/conda/bin/python", sys.executable) for key, value in env.items()}


class Agent:
    """``clearml-agent daemon --foreground`` on some queues, without Docker, with the image's
    environment; its console in ``log``."""

    def __init__(self, server: ClearMLStandIn, folder: Path, queues: list[str]):
        self.log = folder / "agent.log"
        env = server.client_environment(folder / "home", **image_environment())
        command = [sys.executable, "-m", "clearml_agent", "daemon", "--queue", *queues, "--foreground"]
        command.append("--create-queue")  # as a first agent on a fresh server is started
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The stand-in server with two agents: one for the steps (queues gpu and cpu), one for a
    controller sent to the services queue."""
    root = tmp_path_factory.mktemp("server-mode")
    with ClearMLStandIn(root / "server") as server:
        agents = [
            Agent(server, root / name, queues)
            for name, queues in (("steps", ["gpu", "cpu"]), ("services", ["services"]))
        ]
        server.agents = agents
        server.root = root
        server.repo, server.commit = snapshot_of_the_working_tree(root / "repo")
        server.data = make_layout(root / "data", per_split=(8, 3, 3))
        yield server
        for agent in agents:
            agent.stop()
        state = {"tasks": server.api.tasks, "models": server.api.models, "calls": server.api.calls}
        (root / "server-state.json").write_text(json.dumps(state, indent=1, default=str))  # to read after a failure
    assert not server.api.unknown, f"the SDK called endpoints the stand-in lacks: {sorted(set(server.api.unknown))}"
    assert not server.api.faults and not server.files.faults, server.api.faults + server.files.faults


def launch(server: ClearMLStandIn, *args: str, timeout: float = 900, checkout: Path | None = None):
    """``python pipelines/run_pipeline.py ARGS`` in a checkout (the snapshot), as a user runs it."""
    checkout = checkout or server.repo
    return subprocess.run(
        [sys.executable, "pipelines/run_pipeline.py", *args],
        cwd=checkout,
        env=server.client_environment(server.root / "user", PYTHONPATH=str(checkout)),  # its code, not the installed
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def smoke_args(server: ClearMLStandIn, data: str | Path, *args: str) -> list[str]:
    return [
        "--data", str(data), "--preset", "smoke", "--epochs", "1", "--finetune-steps", "2", "--benchmark", "quick",
        "--queue", "gpu", "--cpu-queue", "cpu", "--output-uri", f"{server.files_host}/bucket", *args,
    ]  # fmt: skip


def controllers(server: ClearMLStandIn) -> list[dict]:
    return sorted((t for t in server.api.tasks.values() if t["type"] == "controller"), key=lambda t: t["created"])


def steps_of(server: ClearMLStandIn, controller: dict) -> dict[str, dict]:
    """The step tasks a controller launched, by step name (a cached step is the task reused)."""
    tasks = server.api.tasks
    launched = {t["name"]: t for t in tasks.values() if t.get("parent") == controller["id"]}
    state = json.loads(controller["configuration"]["Pipeline"]["value"])
    for name, node in state.items():
        if name not in launched and node.get("executed"):
            launched[name] = tasks[node["executed"]]
    return launched


def artifact(server: ClearMLStandIn, task: dict, key: str) -> dict:
    return next(a for a in task["execution"]["artifacts"] if a["key"] == key)


def returned(server: ClearMLStandIn, task: dict, key: str):
    """What a step returned: a plain string as a parameter, anything else as a pickled artifact."""
    import pickle

    if key in task["hyperparams"].get("return", {}):
        return task["hyperparams"]["return"][key]["value"]
    return pickle.loads(download(server, artifact(server, task, key)["uri"]))


def download(server: ClearMLStandIn, uri: str) -> bytes:
    assert uri.startswith(server.files_host), f"{uri} is not on the file server"
    with urllib.request.urlopen(uri) as response:
        return response.read()


def wait_until_finished(server: ClearMLStandIn, task_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while server.api.tasks[task_id]["status"] not in FINISHED:
        assert time.monotonic() < deadline, f"task {task_id} did not finish within {timeout} s"
        time.sleep(2)
    return server.api.tasks[task_id]


@pytest.fixture(scope="module")
def first_run(server) -> dict:
    """The pipeline launched from a checkout whose origin is a plain path, with a local data folder."""
    run = launch(server, *smoke_args(server, server.data))
    controller = controllers(server)[-1]
    return {"run": run, "controller": controller, "steps": steps_of(server, controller)}


def test_every_step_runs_on_an_agent_and_the_command_says_the_pipeline_completed(server, first_run):
    run = first_run["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert first_run["controller"]["status"] == "completed"
    assert {name: task["status"] for name, task in first_run["steps"].items()} == dict.fromkeys(STEPS, "completed")
    for task in first_run["steps"].values():  # cloned by an agent from the origin, given as a plain path
        assert task["script"]["repository"] == server.repo.as_uri()
        assert task["script"]["version_num"] == server.commit
    assert "pipeline completed" in run.stdout.strip().splitlines()[-1]


def test_the_controller_records_its_repository_so_an_agent_can_run_it(server, first_run):
    script = first_run["controller"]["script"]
    assert (script["repository"], script["version_num"]) == (server.repo.as_uri(), server.commit)
    assert script["entry_point"] == "pipelines/run_pipeline.py" and script["working_dir"] == "."


def test_steps_hand_on_ids_and_models_travel_through_the_file_server(server, first_run):
    steps = first_run["steps"]
    dataset_id = returned(server, steps["fetch_data"], "data")
    assert "dataset" in server.api.tasks[dataset_id]["system_tags"]
    model_id = returned(server, steps["train"], "checkpoint")
    model = server.api.models[model_id]
    assert model["labels"] == {label: index for index, label in enumerate(CLASSES)}
    assert model["uri"].startswith(f"{server.files_host}/bucket/") and download(server, model["uri"])[:2] == b"PK"
    for name in ("evaluate", "highres"):  # loaded the trained model, recorded once as its input
        assert [m["model"] for m in steps[name]["models"]["input"]] == [model_id]
    highres_models = [m["model"] for m in steps["highres"]["models"]["output"]]
    assert len(highres_models) == 1 and server.api.models[highres_models[0]]["uri"].startswith(server.files_host)


def test_datasets_go_to_the_output_uri(server, first_run):
    dataset_id = returned(server, first_run["steps"]["fetch_data"], "data")
    for task_id in (dataset_id, *server.api.tasks[dataset_id]["runtime"].get("parents", [])):
        uploaded = [
            a["uri"] for a in server.api.tasks[task_id]["execution"]["artifacts"] if a["key"].startswith("data")
        ]
        assert uploaded and all(uri.startswith(f"{server.files_host}/bucket/") for uri in uploaded)


def test_the_pipeline_page_shows_the_results_and_the_models(server, first_run):
    controller = server.api.tasks[first_run["controller"]["id"]]
    shown = last_metrics(controller).get("results", {})
    assert {"test accuracy @ training size", "test accuracy @ high res, fine-tuned"} <= set(shown)
    assert "best speed-up of sdpa over separate QKV" in shown
    trained = returned(server, first_run["steps"]["train"], "checkpoint")
    models = {m["model"] for m in controller["models"]["output"]}
    assert trained in models and len(models) == 2  # the trained model and the one kept at the high resolution


def test_the_summary_keeps_its_report_and_summary_json_as_artifacts(server, first_run):
    summary = first_run["steps"]["summary"]
    report = download(server, artifact(server, summary, "report.html")["uri"]).decode()
    assert report.count("data:image/png;base64,") >= 5  # the other steps' plots, fetched from their tasks
    assert json.loads(download(server, artifact(server, summary, "summary.json")["uri"]))["mode"] == "server"


def test_the_launcher_says_where_agents_are_needed_and_warns_of_a_loopback_destination(server, first_run):
    out = first_run["run"].stdout
    assert re.search(r"clearml-agent daemon --queue gpu --docker \S+ --gpus all", out)
    assert re.search(r"clearml-agent daemon --queue cpu --docker \S+\n", out)  # no GPU for the CPU queue
    assert f"{server.files_host}/bucket" in out and "loopback" in out


def test_the_agents_install_nothing_in_the_image(server, first_run):
    log = server.agents[0].log.read_text()
    assert "Running task id" in log
    assert not re.search(r"pip install|Collecting |Successfully installed|Creating virtual environment", log)


@pytest.fixture(scope="module")
def second_run(server, first_run) -> dict:
    """The same data again, from the first run's model, with the controller run by an agent."""
    model_id = returned(server, first_run["steps"]["train"], "checkpoint")
    run = launch(server, *smoke_args(server, server.data, "--init", model_id, "--controller-queue", "services"))
    controller = wait_until_finished(server, controllers(server)[-1]["id"])
    return {"run": run, "controller": controller, "steps": steps_of(server, controller), "init": model_id}


def test_a_controller_run_by_an_agent_keeps_its_queues_and_output_destination(server, second_run):
    assert second_run["run"].returncode == 0, second_run["run"].stdout[-3000:] + second_run["run"].stderr[-3000:]
    assert second_run["controller"]["status"] == "completed"
    queue_names = {queue["id"]: queue["name"] for queue in server.api.queues.values()}
    for name, task in second_run["steps"].items():
        if name == "fetch_data":
            continue  # cached, see below
        assert queue_names[task["execution"]["queue"]] == ("cpu" if name == "summary" else "gpu")
        assert task["output"]["destination"] == f"{server.files_host}/bucket"


def test_a_second_run_with_the_same_data_reuses_the_dataset_and_fetch_data(server, first_run, second_run):
    assert second_run["steps"]["fetch_data"]["id"] == first_run["steps"]["fetch_data"]["id"]
    datasets = [t for t in server.api.tasks.values() if "dataset" in t["system_tags"]]
    assert len(datasets) == 1  # registered by the first run (what fetch_data prepares from it has the same content)


def test_initial_weights_from_a_model_id_are_one_input_of_training(server, second_run):
    assert [m["model"] for m in second_run["steps"]["train"]["models"]["input"]] == [second_run["init"]]


def test_a_failing_step_fails_the_command_naming_the_step(server, first_run):
    broken = server.root / "broken"
    (broken / "train").mkdir(parents=True)
    (broken / "train" / "notes.txt").write_text("no images here")
    registered = subprocess.run(
        [sys.executable, "-c", "from clearml import Dataset; d = Dataset.create(dataset_name='broken', "
         "dataset_project='tests'); d.add_files(r'" + str(broken) + "'); d.upload(); d.finalize(); print(d.id)"],
        env=server.client_environment(server.root / "user"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr[-2000:]
    run = launch(server, *smoke_args(server, registered.stdout.split()[-1]))
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "fetch_data" in run.stderr.strip().splitlines()[-1] and "failed" in run.stderr
    assert controllers(server)[-1]["status"] == "failed"


def test_inputs_the_agents_could_not_use_are_refused_before_anything_is_launched(server, first_run, tmp_path):
    unpushed = tmp_path / "unpushed"
    git("clone", "-q", str(server.repo), str(unpushed), cwd=tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "--allow-empty", "-m", "x", cwd=unpushed)
    cases = {  # what the error says: (flags, the checkout it is run from)
        "nor a ClearML Dataset the server knows": (["--data", "0123456789abcdef0123456789abcdef"], server.repo),
        "cannot be cloned": (["--repo", str(tmp_path / "nowhere")], server.repo),
        "is not on": ([], unpushed),  # its HEAD, never pushed to its origin
    }
    tasks_before = len(server.api.tasks)
    for expected, (args, checkout) in cases.items():
        started = time.monotonic()
        run = launch(server, *smoke_args(server, server.data), *args, timeout=120, checkout=checkout)
        assert run.returncode == 2 and time.monotonic() - started < 60, (args, run.stdout[-2000:], run.stderr[-2000:])
        assert run.stderr.startswith("run_pipeline: error: ") and len(run.stderr.strip().splitlines()) == 1
        assert expected in run.stderr, run.stderr
    assert len(server.api.tasks) == tasks_before


def test_ctrl_c_stops_the_pipeline_and_its_running_steps(server, first_run):
    env = server.client_environment(server.root / "user", PYTHONPATH=str(server.repo))
    launcher = subprocess.Popen(
        [sys.executable, "pipelines/run_pipeline.py", *smoke_args(server, server.data, "--epochs", "300")],
        cwd=server.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 300
    controller = None
    while time.monotonic() < deadline:
        newest = controllers(server)[-1]
        if newest["id"] != first_run["controller"]["id"] and newest["status"] == "in_progress":
            train = [t for t in server.api.tasks.values() if t.get("parent") == newest["id"] and t["name"] == "train"]
            if train and train[0]["status"] == "in_progress":
                controller = newest
                break
        time.sleep(1)
    assert controller is not None, "training never started"
    os.killpg(launcher.pid, signal.SIGINT)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, stderr[-2000:]
    assert "runs/" not in stderr and "stopped" in stderr
    for task in steps_of(server, server.api.tasks[controller["id"]]).values():
        assert wait_until_finished(server, task["id"], timeout=60)["status"] in ("completed", "stopped")


@pytest.mark.skipif(
    not all(
        os.environ.get(k) for k in ("CLEARML_API_HOST_FOR_TESTS", "CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY")
    ),
    reason="needs a real ClearML server with an agent on the gpu queue: set CLEARML_API_HOST_FOR_TESTS, "
    "CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY (tests force ClearML offline otherwise)",
)
def test_the_whole_pipeline_on_a_real_server(tmp_path):
    env = {**os.environ, "CLEARML_API_HOST": os.environ["CLEARML_API_HOST_FOR_TESTS"], "PYTHONUNBUFFERED": "1"}
    for key in ("CLEARML_OFFLINE_MODE", "CLEARML_CONFIG_FILE", "CLEARML_CACHE_DIR", "HEADGEAR_DATA_STORE"):
        env.pop(key, None)
    data = make_layout(tmp_path / "data", per_split=(8, 3, 3))
    command = [sys.executable, "pipelines/run_pipeline.py", "--data", str(data), "--preset", "smoke"]
    command += ["--epochs", "1", "--finetune-steps", "2", "--benchmark", "quick"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].startswith("pipeline completed: ")
