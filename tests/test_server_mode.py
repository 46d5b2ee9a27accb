"""Every server-mode step run the way clearml-agent runs it, from what ``run_pipeline.py
--dry-run`` says it will run.

For each step, in DAG order: a fresh ``git clone`` of this repository at HEAD (so the test
runs the committed code, not uncommitted changes), the step's generated script written as
``<function>.py`` at the clone's root, run in a fresh process with the clone as working
folder, ClearML offline, HOME and ClearML's cache in the step's own folder. When a step is
done its clone is deleted: the next step cannot see its files, as on another agent.

No ClearML server can run here, so a small bootstrap (BOOTSTRAP below) stands in for what
needs one, and only that:
- the agent sets the step's parameters on its task before the script starts; offline there
  is no such task, so the bootstrap hands the resolved values to the script's
  ``task.connect(kwargs)`` and ``task.get_parameters()``;
- the script fetches its inputs from the parent steps' tasks by id (``Task.get_task``): the
  bootstrap answers with what the parent stored, read back from the parent's offline session;
- the Dataset and model registries (``clearml.Dataset``, ``OutputModel``, ``InputModel``) are
  a folder the steps cannot otherwise see, and the code's server branch is taken
  (``server_configured`` answers True), so that what the steps hand on is the id a server
  would give.
Everything else (the generated script, ClearML's offline task, the components) is real.
"""

import datetime
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from components.tracking import TrackingError, child_environment
from pipelines.run_pipeline import DAG
from tests.conftest import CLASSES, REPO, make_layout
from tests.sessions import read_session, scalars

BOOTSTRAP = r'''
"""Runs a generated step script as the agent would, with the fake server of the test."""
import datetime
import itertools
import json
import pickle
import runpy
import shutil
import sys
import types
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text())
script = Path(spec["script"]).resolve()
sys.path[0] = str(script.parent)  # what `python <function>.py` at the clone's root gives the script
sys.argv = [str(script)]
server = Path(spec["server"])
registry_path = server / "registry.json"
scratch = Path(spec["scratch"])
counter = itertools.count()


def registry():
    return json.loads(registry_path.read_text())


def save(data):
    registry_path.write_text(json.dumps(data, indent=1))


def local_copy(path):
    """A download: a copy in this step's own folder."""
    target = scratch / f"download-{next(counter)}" / Path(path).name
    target.parent.mkdir(parents=True)
    (shutil.copytree if Path(path).is_dir() else shutil.copyfile)(path, target)
    return str(target)


import clearml
from clearml import Task

import components.tracking

components.tracking.server_configured = lambda: True  # the server branch of the code


class Dataset:
    def __init__(self, dataset_id, entry=None):
        self.id, self.entry = dataset_id, entry

    @staticmethod
    def list_datasets(dataset_project, tags, only_completed=True):
        found = registry()["datasets"].items()
        return [{"id": i} for i, d in found if d["project"] == dataset_project and d["tags"] == tags]

    @staticmethod
    def create(dataset_name, dataset_project, dataset_tags=None, parent_datasets=None):
        dataset_id = f"dataset-{len(registry()['datasets'])}"
        return Dataset(dataset_id, {"project": dataset_project, "tags": dataset_tags, "parents": parent_datasets})

    def sync_folder(self, local_path):
        shutil.copytree(local_path, server / self.id)
        self.entry["path"] = str(server / self.id)

    def upload(self, show_progress=True):
        pass

    def finalize(self):
        data = registry()
        data["datasets"][self.id] = self.entry
        save(data)

    @staticmethod
    def get(dataset_id):
        if dataset_id not in registry()["datasets"]:
            raise ValueError(f"no dataset {dataset_id}")
        return Dataset(dataset_id, registry()["datasets"][dataset_id])

    def get_local_copy(self):
        return local_copy(self.entry["path"])


class OutputModel:
    def __init__(self, task, name, config_dict, framework, label_enumeration):
        self.id = f"model-{name.replace(' ', '-')}"
        self.entry = {"task": task.id, "name": name, "labels": label_enumeration, "framework": framework}

    def update_weights(self, weights_filename, auto_delete_file=False):
        shutil.copyfile(weights_filename, server / f"{self.id}.pt")
        data = registry()
        data["models"][self.id] = {**self.entry, "path": str(server / f"{self.id}.pt")}
        save(data)


class InputModel:
    def __init__(self, model_id):
        if model_id not in registry()["models"]:
            raise ValueError(f"no model {model_id}")
        self.id = model_id

    def connect(self, task, name=None, ignore_remote_overrides=False):
        # On an agent, without it ClearML swaps in the input model a cloned task held before.
        assert ignore_remote_overrides, "the model given must be the model loaded"
        data = registry()
        data["inputs"].setdefault(task.id, []).append(self.id)
        save(data)

    def get_local_copy(self, raise_on_error=False):
        return local_copy(registry()["models"][self.id]["path"])


class Artifact:
    def __init__(self, path):
        self.path = path

    def get(self, deserialization_function=None):
        if self.path.endswith(".pkl"):
            return pickle.loads(Path(self.path).read_bytes())
        return self.path

    def get_local_copy(self, raise_on_error=False):
        return local_copy(self.path)


class StoredTask:
    """A finished parent step, as the server returns it."""

    def __init__(self, stored):
        self.artifacts = {key: Artifact(path) for key, path in stored["artifacts"].items()}
        self.parameters = stored["parameters"]
        times = {key: datetime.datetime.fromisoformat(stored[key]) for key in ("started", "completed")}
        self.data = types.SimpleNamespace(**times)  # when the agent ran it, as the server records

    def get_parameters(self, cast=False):
        return self.parameters


clearml.Dataset, clearml.OutputModel, clearml.InputModel = Dataset, OutputModel, InputModel
Task.get_task = classmethod(lambda cls, task_id=None, **_: StoredTask(registry()["tasks"][task_id]))

# The agent's part: the step's parameters set on its task before the script runs.
connect = Task.connect


def connect_with_the_agents_values(self, mutable, name=None, *args, **kwargs):
    if name == "kwargs":
        mutable.update(spec["kwargs"])
    return connect(self, mutable, name, *args, **kwargs)


get_parameters = Task.get_parameters


def get_parameters_with_inputs(self, *args, **kwargs):
    inputs = {f"kwargs_artifacts/{key}": value for key, value in spec["kwargs_artifacts"].items()}
    return {**(get_parameters(self, *args, **kwargs) or {}), **inputs}


Task.connect, Task.get_parameters = connect_with_the_agents_values, get_parameters_with_inputs
runpy.run_path(str(script), run_name="__main__")
'''


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def read_back(archive: Path) -> dict:
    """A step's offline session: its task.json and its artifacts' files, by artifact name."""
    session = read_session(archive)
    files = {}
    with zipfile.ZipFile(archive) as zf:
        for entry in session["task"].get("execution", {}).get("artifacts", []):
            stored = [n for n in zf.namelist() if f"/artifacts/{entry['key']}/" in n]
            if stored:
                files[entry["key"]] = zf.read(stored[0]), Path(stored[0]).name
    returned = {k: v["value"] for k, v in session["task"].get("hyperparams", {}).get("return", {}).items()}
    return {**session, "artifact_files": files, "returned": returned}


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory) -> dict:
    """Every step of the dry run, run as an agent runs it; returns what each left behind."""
    root = tmp_path_factory.mktemp("agents")
    server = root / "server"  # the fake server's registries: no step's folder
    server.mkdir()
    raw = make_layout(server / "raw-dataset", per_split=(8, 3, 3))
    registry = {"datasets": {"raw-dataset": {"project": "uploads", "tags": [], "path": str(raw)}}}
    (server / "registry.json").write_text(json.dumps({**registry, "models": {}, "inputs": {}, "tasks": {}}))

    commit = git("rev-parse", "HEAD")
    dry = root / "dry-run"
    command = [sys.executable, "pipelines/run_pipeline.py", "--dry-run", str(dry), "--data", "raw-dataset"]
    command += ["--preset", "smoke", "--epochs", "1", "--finetune-steps", "2", "--benchmark", "quick"]
    command += ["--repo", REPO.as_uri(), "--commit", commit]
    built = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    parameters = json.loads((dry / "pipeline.json").read_text())["parameters"]

    (root / "bootstrap.py").write_text(BOOTSTRAP)
    task_ids, runs = {}, {}
    for name in DAG:
        task = json.loads((dry / name / "task.json").read_text())
        folder = root / name
        clone = folder / "clone"
        git("clone", "-q", task["script"]["repository"], str(clone), cwd=root)
        git("checkout", "-q", task["script"]["version_num"], cwd=clone)
        script = clone / task["script"]["entry_point"]
        script.write_text(task["script"]["diff"])
        # the controller resolves ${pipeline.X} and ${STEP.id} before it enqueues the step
        kwargs, inputs = {}, {}
        for key, value in task["pipeline"]["parameters"].items():
            section, argument = key.split("/", 1)
            for step, task_id in task_ids.items():
                value = value.replace(f"${{{step}.id}}", task_id)
            for parameter, parameter_value in parameters.items():
                value = value.replace(f"${{pipeline.{parameter}}}", str(parameter_value))
            (inputs if section == "kwargs_artifacts" else kwargs)[argument] = value
        spec = {"script": str(script), "server": str(server), "scratch": str(folder / "downloads")}
        (folder / "spec.json").write_text(json.dumps({**spec, "kwargs": kwargs, "kwargs_artifacts": inputs}))
        env = child_environment(
            CLEARML_OFFLINE_MODE="1",
            CLEARML_CONFIG_FILE=str(clone / "components" / "clearml-offline.conf"),
            CLEARML_CACHE_DIR=str(folder / "clearml-cache"),
            HOME=str(folder / "home"),
            HEADGEAR_DATA_STORE=str(folder / "store"),
            MPLBACKEND="Agg",
        )
        env.pop("PYTHONPATH", None)
        started = datetime.datetime.now(datetime.timezone.utc)
        run = subprocess.run(
            [sys.executable, str(root / "bootstrap.py"), str(folder / "spec.json")],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        sessions = sorted((folder / "clearml-cache" / "offline").glob("*.zip"))
        runs[name] = {"run": run, "sessions": sessions, "script": task["script"]["entry_point"]}
        if run.returncode != 0 or len(sessions) != 1:
            break
        stored = read_back(sessions[0])
        runs[name]["stored"] = stored
        task_ids[name] = stored["task"]["id"]
        artifacts = {}
        for key, (content, filename) in stored["artifact_files"].items():
            path = server / "tasks" / task_ids[name] / key / filename
            path.parent.mkdir(parents=True)
            path.write_bytes(content)
            artifacts[key] = str(path)
        registry = json.loads((server / "registry.json").read_text())
        params = {f"return/{k}": v for k, v in stored["returned"].items()}
        times = {"started": started.isoformat(), "completed": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        registry["tasks"][task_ids[name]] = {"artifacts": artifacts, "parameters": params, **times}
        (server / "registry.json").write_text(json.dumps(registry))
        shutil.rmtree(clone)  # the agent's container is gone; the next step runs elsewhere
    return {"runs": runs, "registry": json.loads((server / "registry.json").read_text()), "task_ids": task_ids}


@pytest.mark.parametrize("name", list(DAG))
def test_the_step_runs_from_a_fresh_clone_and_stores_its_return_values(agent_run, name):
    step = agent_run["runs"].get(name)
    assert step is not None, f"{name} did not run: an earlier step failed"
    run = step["run"]
    assert run.returncode == 0, f"{step['script']} failed:\n{run.stdout[-3000:]}\n{run.stderr[-4000:]}"
    assert len(step["sessions"]) == 1, f"one task per step, the script's own: {step['sessions']}"
    stored = step["stored"]
    for returned in DAG[name].returns:  # stored while the step's task was still open
        assert returned in stored["artifact_files"] or returned in stored["returned"], (
            f"{name} returned {returned!r} but its task holds neither an artifact nor a parameter of that name"
        )
    if "result" in DAG[name].returns:  # what the summary step reads: the component's result dict itself
        assert isinstance(pickle.loads(stored["artifact_files"]["result"][0]), dict)


def test_steps_hand_on_ids_never_paths(agent_run):
    registry, runs = agent_run["registry"], agent_run["runs"]
    data = runs["fetch_data"]["stored"]["returned"]["data"]
    model = runs["train"]["stored"]["returned"]["checkpoint"]
    assert data in registry["datasets"] and not Path(data).exists()
    assert model in registry["models"] and not Path(model).exists()
    assert registry["datasets"][data]["parents"] == ["raw-dataset"]  # prepared from that Dataset
    assert registry["models"][model]["labels"] == {label: i for i, label in enumerate(CLASSES)}
    # evaluate and highres loaded the registered model and record it as their input
    for name in ("evaluate", "highres"):
        assert registry["inputs"][agent_run["task_ids"][name]] == [model]
    highres_models = [m for m in registry["models"].values() if m["task"] == agent_run["task_ids"]["highres"]]
    assert len(highres_models) == 1 and highres_models[0]["labels"] == registry["models"][model]["labels"]


def test_the_results_and_the_report_are_kept_on_the_server(agent_run):
    runs = agent_run["runs"]
    evaluated = runs["evaluate"]["stored"]
    assert len(scalars(evaluated, "results", "test accuracy @ training size")) == 1  # on the pipeline page
    assert scalars(runs["highres"]["stored"], "results", "test accuracy @ high res, fine-tuned")
    assert scalars(runs["benchmark_attention"]["stored"], "results", "best speed-up of fused over separate QKV")
    assert any(key.startswith("plot ") for key in runs["train"]["stored"]["artifact_files"])
    summary = runs["summary"]["stored"]["artifact_files"]
    report = summary["report.html"][0].decode()
    assert report.count("data:image/png;base64,") >= 5  # the other steps' plots, fetched from their tasks
    assert json.loads(summary["summary.json"][0])["mode"] == "server"
    assert all(f"{name} " in report.split("wall time", 1)[1] for name in ("fetch_data", "train", "highres"))


def test_a_local_data_archive_becomes_a_dataset_before_the_pipeline_starts(monkeypatch, tmp_path):
    # The agents cannot read this machine's disk: run_pipeline registers a local --data and hands
    # the steps the Dataset id. No server here: clearml.Dataset is an in-memory registry.
    from clearml import Dataset

    from pipelines.run_pipeline import upload_local_data
    from tests.conftest import zip_folder

    registered = []

    class Registered:
        id = "dataset-uploaded"

        def sync_folder(self, local_path):
            self.files = sorted(p.relative_to(local_path).as_posix() for p in Path(local_path).rglob("*.jpg"))

        def upload(self, show_progress=True):
            pass

        def finalize(self):
            registered.append(self)

    def create(dataset_name, dataset_project, dataset_tags, parent_datasets):
        return Registered()

    def list_datasets(dataset_project, tags, only_completed):
        return [{"id": d.id} for d in registered]

    monkeypatch.setattr(Dataset, "create", staticmethod(create))
    monkeypatch.setattr(Dataset, "list_datasets", staticmethod(list_datasets))
    archive = zip_folder(make_layout(tmp_path / "data", per_split=(4, 2, 2)), tmp_path / "headgear.zip")
    assert upload_local_data(str(archive)) == upload_local_data(str(archive)) == "dataset-uploaded"
    assert len(registered) == 1 and len(registered[0].files) == (4 + 2 + 2) * len(CLASSES)


def test_a_model_without_weights_or_unknown_to_the_server_is_a_clear_error(monkeypatch):
    # No server here: InputModel is replaced by what ClearML does for these cases (read from its source).
    import clearml

    from components import checkpoints, tracking

    class NoWeights:  # registered without an uploaded file: get_local_copy returns None
        def __init__(self, model_id):
            pass

        def get_local_copy(self, raise_on_error=False):
            return None

    class Unknown(NoWeights):  # an id the server does not know: its data stays None
        def get_local_copy(self, raise_on_error=False):
            raise AttributeError("'NoneType' object has no attribute 'system_tags'")

    monkeypatch.setattr("components.tracking.server_configured", lambda: True)
    for stand_in, reason in ((NoWeights, "it has no weights file"), (Unknown, "AttributeError")):
        tracking.registered_model.cache_clear()
        monkeypatch.setattr(clearml, "InputModel", stand_in)
        with pytest.raises(TrackingError, match=f"no ClearML model m1 could be downloaded \\({reason}"):
            checkpoints.local_copy("m1")
    tracking.registered_model.cache_clear()


def test_a_model_that_cannot_be_downloaded_is_a_clear_error(monkeypatch, tmp_path):
    # With a server, a model id resolves through InputModel; one that fails is said so, not a None path.
    import clearml

    from components import checkpoints

    class Unreachable:
        def __init__(self, model_id):
            pass

        def get_local_copy(self, raise_on_error=False):
            assert raise_on_error, "get_local_copy returns None on failure unless raise_on_error=True"
            raise ValueError("Could not retrieve a local copy of model weights")

    monkeypatch.setattr("components.tracking.server_configured", lambda: True)
    monkeypatch.setattr(clearml, "InputModel", Unreachable)
    with pytest.raises(TrackingError, match="no ClearML model abc123 could be downloaded.*--output-uri"):
        checkpoints.local_copy("abc123")


@pytest.mark.skipif(
    not all(
        os.environ.get(k) for k in ("CLEARML_API_HOST_FOR_TESTS", "CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY")
    ),
    reason="needs a real ClearML server with an agent on the queue: set CLEARML_API_HOST_FOR_TESTS, "
    "CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY (tests force ClearML offline otherwise)",
)
def test_the_whole_pipeline_on_a_real_server(tmp_path):
    env = child_environment(CLEARML_API_HOST=os.environ["CLEARML_API_HOST_FOR_TESTS"])
    env.pop("CLEARML_OFFLINE_MODE", None)
    env.pop("CLEARML_CONFIG_FILE", None)
    data = make_layout(tmp_path / "data", per_split=(8, 3, 3))
    command = [sys.executable, "pipelines/run_pipeline.py", "--data", str(data), "--preset", "smoke"]
    command += ["--epochs", "1", "--finetune-steps", "2", "--benchmark", "quick"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
