"""optimize.py: the search over the training settings.

Local mode for real: a seeded Optuna study of the smoke preset (1 epoch per trial) on the shapes
archive, stored in SQLite, each trial a real training run with its offline ClearML session.
Server mode against the ClearML stand-in (tests/clearml_server.py) with a real agent: the real
SDK makes the base task and the optimizer's task, ClearML's HyperParameterOptimizer with
OptimizerOptuna clones and enqueues the trials, the agent trains them. What this cannot show
without a real server: Optuna's pruner stopping a trial (here every trial runs 1 epoch, fewer
than --prune-after, so none is pruned: pruning on live scalars from several agents is left to a
real server), the optimizer's page as the web UI draws it (only the reports that reach the
stand-in are checked), several agents taking trials at once, and Docker.
"""

import json
import subprocess
import sys
import time

import pytest

from components.common.presets import preset
from components.common.run_folder import claimed
from pipelines.optimize import main
from pipelines.search_space import default_space
from tests.archives import make_layout
from tests.clearml_server import ClearMLStandIn, last_metrics
from tests.repository import REPO
from tests.sessions import read_session, scalars

# vit-ti16's patch (16) does not divide 24: every trial that draws it fails, the others train.
SEARCH = ["--preset", "smoke", "--epochs", "1", "--seed", "3", "--space", "model=vit-tiny-test,vit-ti16"]
SEARCH += ["--space", "image_size=24", "--only", "lr,model,image_size", "--local"]


@pytest.fixture(scope="module")
def study(shapes_zip, tmp_path_factory) -> dict:
    """Two trials, then the same command with --trials 3."""
    output = tmp_path_factory.mktemp("study")
    first_code = main(["--data", str(shapes_zip), *SEARCH, "--output", str(output), "--trials", "2"])
    first = json.loads((output / "optimize.json").read_text())
    ended = {
        n: (output / f"trial-{n}" / "train.json").stat().st_mtime for n in (0, 1) if (output / f"trial-{n}").exists()
    }
    second_code = main(["--data", str(shapes_zip), *SEARCH, "--output", str(output), "--trials", "3"])
    return {"output": output, "codes": (first_code, second_code), "first": first, "ended": ended,
            "summary": json.loads((output / "optimize.json").read_text())}  # fmt: skip


@pytest.mark.slow
def test_the_study_runs_its_trials_and_resumes_with_only_the_missing_one(study):
    assert study["codes"] == (0, 0)
    assert [t["number"] for t in study["first"]["trials"]] == [0, 1]
    assert [t["number"] for t in study["summary"]["trials"]] == [0, 1, 2]
    for number, modified in study["ended"].items():  # the second call left the first trials alone
        assert (study["output"] / f"trial-{number}" / "train.json").stat().st_mtime == modified
    assert (study["output"] / "study.db").is_file()


@pytest.mark.slow
def test_a_failed_trial_is_recorded_with_its_reason_and_the_study_goes_on(study):
    trials = study["summary"]["trials"]
    failed = [t for t in trials if t["state"] == "fail"]
    completed = [t for t in trials if t["state"] == "complete"]
    assert failed and completed, trials  # seed 3 draws both models
    for trial in failed:
        assert trial["params"]["model"] == "vit-ti16" and trial["value"] is None
        assert "not a multiple of the patch size 16" in trial["error"]
    assert all(t["params"]["model"] == "vit-tiny-test" for t in completed)


@pytest.mark.slow
def test_each_trial_is_a_training_run_whose_best_validation_is_its_value(study):
    for trial in study["summary"]["trials"]:
        if trial["state"] != "complete":
            continue
        folder = study["output"] / trial["folder"]
        trained = json.loads((folder / "train.json").read_text())
        assert trained["config"]["lr"] == trial["params"]["lr"] and trained["config"]["image_size"] == 24
        session = read_session(folder / "train.clearml-offline.zip")
        assert max(scalars(session, "accuracy", "valid")) == pytest.approx(trial["value"])


@pytest.mark.slow
def test_the_best_trial_is_picked_and_its_settings_are_written_for_the_pipeline(study):
    summary = study["summary"]
    values = [t["value"] for t in summary["trials"] if t["state"] == "complete"]
    assert summary["best"]["value"] == max(values)
    assert json.loads((study["output"] / "best.json").read_text()) == summary["best"]["params"]
    preset("smoke", **summary["best"]["params"])  # settings the training takes as they are
    assert (study["output"] / "optimize.png").stat().st_size > 10_000
    session = read_session(study["output"] / "optimize.clearml-offline.zip")
    assert "trials" in session["text"] and "objective by trial and by setting" in session["text"]


@pytest.mark.slow
def test_a_study_of_another_search_is_not_resumed(study, shapes_zip, capsys):
    changed = [a if a != "lr,model,image_size" else "model,image_size" for a in SEARCH]
    assert main(["--data", str(shapes_zip), *changed, "--output", str(study["output"]), "--trials", "4"]) == 2
    assert "holds a study of another search" in capsys.readouterr().err


@pytest.mark.slow
def test_a_trial_a_killed_run_left_running_is_recorded_and_run_again(shapes_zip, tmp_path):
    import optuna

    search = ["--data", str(shapes_zip), "--preset", "smoke", "--epochs", "1", "--only", "lr", "--local"]
    assert main([*search, "--output", str(tmp_path), "--trials", "1"]) == 0
    stored = optuna.load_study(study_name="headgear-vit", storage=f"sqlite:///{tmp_path / 'study.db'}")
    stored.ask()  # trial 1 begins, and its process dies: the storage holds it as running
    assert main([*search, "--output", str(tmp_path), "--trials", "2"]) == 0
    trials = json.loads((tmp_path / "optimize.json").read_text())["trials"]
    assert [(t["number"], t["state"], t["error"]) for t in trials] == [
        (0, "complete", None), (1, "fail", "interrupted"), (2, "complete", None)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--trials", "0"], "--trials: expected a whole number of 1 or more"),
        (["--space", "lr"], "expected NAME=LOW:HIGH"),
        (["--space", "learning_rate=1e-4:1e-2"], "'learning_rate' is not a training setting"),
        (["--space", "lr=1e-2:1e-4"], "LOW must be below HIGH"),
        (["--space", "image_size=30,32"], "outside what preset smoke allows: --image-size 30 is not a multiple"),
        (["--space", "drop_path_rate=0:1.5"], "is a probability, below 1"),
        (["--space", "model=vit-huge"], "outside what preset smoke allows: --model 'vit-huge'"),
        (["--only", "lr,mixup_alpha"], "--only mixup_alpha: not in the space"),
    ],
)
def test_bad_flags_are_refused_in_one_line_before_any_work(flags, expected, tmp_path, capsys):
    argv = ["--data", str(tmp_path), "--preset", "smoke", "--local", "--output", str(tmp_path / "out"), *flags]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("optimize: error: "), err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not list((tmp_path / "out").iterdir())  # nothing was written


def test_an_output_folder_in_use_is_refused(tmp_path, layout):
    with claimed(tmp_path / "busy"):  # held by this process; the command is another
        run = subprocess.run(
            [sys.executable, "pipelines/optimize.py", "--data", str(layout), "--preset", "smoke", "--local",
             "--output", str(tmp_path / "busy")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert run.returncode == 2 and "is in use by process" in run.stderr, run.stderr
    assert not (tmp_path / "busy" / "study.db").exists()


def test_each_preset_has_a_default_space_the_preset_accepts():
    for name in ("smoke", "cpu-10min", "vit-ti16-224", "finetune"):
        space = default_space(name)
        assert {"lr", "weight_decay", "drop_path_rate", "warmup_epochs", "batch_size"} <= {d.name for d in space}
        for dimension in space:
            for value in dimension.choices or (dimension.low, dimension.high):
                preset(name, **{dimension.name: value})
    assert {d.name for d in default_space("cpu-10min")} >= {"model", "image_size"}
    assert "image_size" not in {d.name for d in default_space("vit-ti16-224")}  # it trains at three sizes


# --- server mode ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_search(tmp_path_factory):
    """optimize.py in server mode against the stand-in, with one agent on the gpu queue."""
    from tests.test_server_mode import Agent, snapshot_of_the_working_tree

    root = tmp_path_factory.mktemp("optimize-server")
    with ClearMLStandIn(root / "server") as server:
        agent = Agent(server, root / "agent", ["gpu"])
        repo, commit = snapshot_of_the_working_tree(root / "repo")
        data = make_layout(root / "data", per_split=(8, 3, 3))
        command = [sys.executable, "pipelines/optimize.py", "--data", str(data), "--preset", "smoke", "--epochs", "1",
                   "--only", "lr,batch_size", "--trials", "2", "--concurrent", "1", "--queue", "gpu",
                   "--poll-seconds", "2", "--prune-after", "5", "--output", str(root / "out"),
                   "--output-uri", f"{server.files_host}/bucket"]  # fmt: skip
        started = time.monotonic()
        run = subprocess.run(
            command, cwd=repo, capture_output=True, text=True, timeout=900,
            env=server.client_environment(root / "user", PYTHONPATH=str(repo)),
        )  # fmt: skip
        agent.stop()
        yield {"server": server, "run": run, "root": root, "commit": commit, "seconds": time.monotonic() - started}
    assert not server.api.unknown, f"the SDK called endpoints the stand-in lacks: {sorted(set(server.api.unknown))}"
    assert not server.api.faults and not server.files.faults, server.api.faults + server.files.faults


def tasks_of(server, kind: str) -> list[dict]:
    return [t for t in server.api.tasks.values() if t["type"] == kind]


@pytest.mark.slow
def test_the_optimizer_clones_the_base_task_with_each_trials_settings_and_agents_train_them(server_search):
    server, run = server_search["server"], server_search["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (optimizer,) = tasks_of(server, "optimizer")
    base = next(t for t in tasks_of(server, "training") if t["name"].endswith("(search base)"))
    settings = {name: p["value"] for name, p in base["hyperparams"]["General"].items()}
    assert settings["lr"] == str(preset("smoke").lr) and settings["epochs"] == "1"
    assert base["script"]["version_num"] == server_search["commit"] and base["status"] == "created"
    trials = [t for t in server.api.tasks.values() if t.get("parent") == optimizer["id"]]
    assert len(trials) == 2
    for trial in trials:
        overrides = {name: p["value"] for name, p in trial["hyperparams"]["General"].items()}
        assert 0.0004 <= float(overrides["lr"]) <= 0.01 and overrides["batch_size"] in ("32", "64", "128")
        assert {k: v for k, v in overrides.items() if k not in ("lr", "batch_size")} == {
            k: v for k, v in settings.items() if k not in ("lr", "batch_size")
        }
        assert trial["status"] == "completed" and trial["output"]["destination"].endswith("/bucket")
        accuracy = last_metrics(trial)["accuracy"]["valid"]  # the objective, as the server keeps it
        assert 0 <= accuracy["max_value"] <= 1


@pytest.mark.slow
def test_the_optimizer_task_shows_the_trials_and_the_best_trial_with_its_model(server_search):
    server, run = server_search["server"], server_search["run"]
    (optimizer,) = tasks_of(server, "optimizer")
    reported = {e.get("metric") for e in server.api.events.get(optimizer["id"], [])}
    assert {"summary", "Optimization Objective", "best trial"} <= reported, reported
    trials = [t for t in server.api.tasks.values() if t.get("parent") == optimizer["id"]]
    best = max(trials, key=lambda t: last_metrics(t)["accuracy"]["valid"]["max_value"])
    best_settings = json.loads((server_search["root"] / "out" / "best.json").read_text())
    assert best_settings["lr"] == float(best["hyperparams"]["General"]["lr"]["value"])
    assert [m["model"] for m in optimizer["models"]["input"]] == [best["models"]["output"][-1]["model"]]
    assert any(a["key"] == "best settings" for a in optimizer["execution"]["artifacts"])
    assert "best: task " + best["id"] in run.stdout


# --- the best settings, handed to the pipeline -------------------------------------------------


def test_the_pipeline_trains_with_the_settings_of_params(layout, tmp_path):
    from pipelines import steps

    settings = json.dumps({"lr": 0.003, "batch_size": 16, "epochs": 5})
    _, trained = steps.train_step(str(layout), "smoke", 1, 0, "", settings, output=str(tmp_path))
    assert (trained["config"]["lr"], trained["config"]["batch_size"]) == (0.003, 16)
    assert trained["config"]["epochs"] == 1  # --epochs wins over the file


@pytest.mark.parametrize(
    "content, expected",
    [('{"learning_rate": 0.1}', "unknown training settings ['learning_rate']"), ("lr=0.1", "cannot read a JSON")],
)
def test_run_pipeline_refuses_params_it_cannot_train_with(content, expected, layout, tmp_path):
    (tmp_path / "best.json").write_text(content)
    run = subprocess.run(
        [sys.executable, "pipelines/run_pipeline.py", "--data", str(layout), "--preset", "smoke", "--local",
         "--params", str(tmp_path / "best.json"), "--output", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and expected in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "run" / "steps").exists()
