"""The pipeline: the local run end to end, the server-mode wiring (built, not started: no server
can run here), and a failing step."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.common.tracking import child_environment
from pipelines.dag import DAG, default_highres_size
from pipelines.local import run_local
from pipelines.server import step_queues
from tests.archives import SHAPE_CLASSES, SHAPES_PER_SPLIT, make_layout
from tests.ports import closed_port
from tests.repository import REPO
from tests.sessions import read_session, scalars

SUMMARY_KEYS = {
    "mode",
    "dataset",
    "train",
    "evaluate",
    "highres",
    "benchmark",
    "clearml",
}


def pipeline_command(*args: str) -> list[str]:
    return [sys.executable, "pipelines/run_pipeline.py", "--local", *args]


def run_pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        pipeline_command(*args), cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def local_run(shapes_zip, tmp_path_factory) -> dict:
    """The whole pipeline run once, locally, on the shape classes: its command's outcome, its
    folder, summary.json and what each step wrote."""
    output = tmp_path_factory.mktemp("local-run")
    run = run_pipeline(
        "--data", str(shapes_zip), "--preset", "smoke", "--output", str(output), "--finetune-steps", "30"
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = {
        "fetched": "fetch_data/fetch_data.json",
        "trained": "train/train.json",
        "evaluated": "evaluate/evaluate.json",
        "highres": "highres/highres.json",
        "benchmark": "benchmark_attention/benchmark.json",
        "summary": "summary.json",
    }
    return {
        "run": run,
        "output": output,
        **{key: json.loads((output / path).read_text()) for key, path in written.items()},
    }


@pytest.mark.slow
def test_the_local_run_writes_a_summary_of_every_step(local_run):
    assert set(local_run["summary"]) == SUMMARY_KEYS and local_run["summary"]["mode"] == "local"


@pytest.mark.slow
def test_the_summary_names_the_data_each_step_used(local_run, shapes_zip):
    fetched = local_run["fetched"]
    assert local_run["summary"]["dataset"] == {
        "source": str(shapes_zip),
        "version": fetched["version"],
        "classes": fetched["classes"],
        "counts": {split: n * len(SHAPE_CLASSES) for split, n in SHAPES_PER_SPLIT.items()},
    }


@pytest.mark.slow
def test_the_summary_holds_what_training_wrote(local_run):
    trained = local_run["trained"]
    assert local_run["summary"]["train"] == {
        "preset": "smoke",
        "epochs": 10,  # the smoke preset's
        "image_size": 32,
        "train_loss": trained["train_loss"],
        "val_accuracy": trained["val_accuracy"],
        "checkpoint": trained["checkpoint"],
    }


@pytest.mark.slow
def test_the_summary_holds_what_evaluate_wrote(local_run):
    evaluated = local_run["evaluated"]
    assert local_run["summary"]["evaluate"] == {
        "image_size": 32,
        "test_accuracy": evaluated["test_accuracy"],
        "test_loss": evaluated["test_loss"],
    }


@pytest.mark.slow
def test_the_summary_holds_what_highres_wrote_at_the_default_size(local_run):
    highres = local_run["highres"]
    kept = (
        "test_accuracy_bilinear",
        "test_accuracy_bicubic",
        "test_accuracy_bicubic_calibrated",
        "attention_scale",
        "test_accuracy_finetuned",
        "finetune_kept",
        "test_accuracy_finetuned_interpolated",
    )
    assert local_run["summary"]["highres"] == {"image_size": 56, **{key: highres[key] for key in kept}}


@pytest.mark.slow
def test_the_summary_holds_every_row_of_the_benchmark(local_run):
    rows = local_run["benchmark"]["rows"]
    assert local_run["summary"]["benchmark"]["rows"] == rows and len(rows) == 16


@pytest.mark.slow
def test_the_pipeline_trains_a_model_that_learned(local_run):
    assert local_run["summary"]["evaluate"]["test_accuracy"] > 0.3  # chance is 0.1
    assert local_run["trained"]["train_loss"][-1] < local_run["trained"]["train_loss"][0]


@pytest.mark.slow
def test_every_step_leaves_an_offline_session_with_what_it_reported(local_run):
    sessions = local_run["summary"]["clearml"]
    assert set(sessions) == {"fetch_data", "train", "evaluate", "highres", "benchmark_attention", "summary"}
    assert all(Path(path).is_file() for path in sessions.values())
    losses = local_run["trained"]["train_loss"]
    assert scalars(read_session(sessions["train"]), "loss", "train") == pytest.approx(losses)
    accuracy = local_run["evaluated"]["test_accuracy"]
    assert scalars(read_session(sessions["evaluate"]), "accuracy", "test @ 32") == [accuracy]
    assert len(scalars(read_session(sessions["highres"]), "fine-tune loss", "train @ 56")) == 30


@pytest.mark.slow
def test_the_report_holds_every_plot_inline_and_fetches_nothing(local_run):
    # curves, confusion, attention maps, 384 bars, 2 curves, pos-embed, attention maps side by side, benchmark
    report = (local_run["output"] / "report.html").read_text()
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", report)
    assert len(sources) == 9 and all(source.startswith("data:image/png;base64,") for source in sources)
    assert not re.search(r"<link|<script|<iframe|url\(|@import", report)


@pytest.mark.slow
def test_the_report_captions_every_plot(local_run):
    report = (local_run["output"] / "report.html").read_text()
    steps = ("trained", "evaluated", "highres", "benchmark")
    captions = [plot["caption"] for step in steps for plot in local_run[step]["plots"]]
    assert len(captions) == 9
    assert all(f"<figcaption>{html.escape(caption)}</figcaption>" in report for caption in captions)


@pytest.mark.slow
def test_the_report_says_what_ran(local_run):
    report = (local_run["output"] / "report.html").read_text()
    assert "clearml-task --import-offline-session" in report and "<dt>seed</dt><dd>0</dd>" in report
    facts = (local_run["fetched"]["version"], local_run["trained"]["device"], f"torch {torch.__version__}")
    assert all(fact in report for fact in facts)


@pytest.mark.slow
def test_the_results_table_is_printed_on_stdout(local_run):
    stdout = local_run["run"].stdout
    assert "test accuracy @ 56, bicubic + fine-tuned" in stdout
    assert f"fine-tuned, x{local_run['highres']['finetune_kept']:.2f} of its change kept" in stdout


@pytest.mark.slow
def test_a_steps_log_keeps_each_progress_bar_as_last_shown(local_run):
    assert "\r" not in (local_run["output"] / "steps" / "train.log").read_text()  # one line each


@pytest.mark.slow
def test_a_failing_step_skips_its_dependents_and_keeps_what_finished(tmp_path, monkeypatch, capfd):
    # highres at a size the patch does not divide fails on its own: the command line refuses
    # such a size before the first step, so the runner is given it past that check.
    highres = DAG["highres"]
    monkeypatch.setitem(DAG, "highres", dataclasses.replace(highres, kwargs={**highres.kwargs, "image_size": 50}))
    data = make_layout(tmp_path / "data", per_split=(16, 4, 4))
    params = {
        "data": str(data),
        "preset": "smoke",
        "epochs": 1,
        "seed": 0,
        "init": "",
        "settings": "{}",
        "nodes": 1,
        "highres_size": 48,
        "finetune_steps": 0,
        "benchmark": "quick",
    }
    assert run_local(params, tmp_path / "run") == 1
    printed = capfd.readouterr()
    status = dict(line.split(maxsplit=1) for line in printed.out.split("steps:\n")[-1].strip().splitlines())
    assert status["fetch_data"] == status["train"] == status["evaluate"] == "completed"
    assert status["highres"].startswith("FAILED") and status["summary"] == "skipped"
    assert "not divisible by the patch size 8" in printed.err  # the step's own error, on the console
    assert (tmp_path / "run" / "evaluate" / "evaluate.json").is_file()  # completed outputs are kept
    assert (tmp_path / "run" / "train" / "checkpoints" / "best.pt").is_file()
    assert not (tmp_path / "run" / "summary.json").exists()


def dry_run(folder: Path, *args: str) -> dict:
    """``run_pipeline.py --dry-run``: the server-mode pipeline built with ClearML offline (no
    server can run here, and none is needed to see what would be sent to one). Returns
    {"pipeline": pipeline.json, STEP: task.json, ...}."""
    run = subprocess.run(
        [sys.executable, "pipelines/run_pipeline.py", "--dry-run", str(folder), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=child_environment(),
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    built = {"pipeline": json.loads((folder / "pipeline.json").read_text())}
    for name in DAG:
        built[name] = json.loads((folder / name / "task.json").read_text())
    return built


IMAGE, GIT_URL, COMMIT = "registry.example/headgear-vit:1", "https://git.example/headgear-vit.git", "0123abc"
OUTPUT_URI = "https://files.example.com/headgear"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The server-mode pipeline of a user who sends the GPU steps to ``a100``, the others to
    ``cpu`` and the benchmark to ``gpu-small``, with an image, repository, commit and upload
    destination of their own."""
    folder = tmp_path_factory.mktemp("dry-run") / "dry"
    built = dry_run(
        folder,
        "--data", "kaggle",
        "--queue", "a100", "--cpu-queue", "cpu", "--step-queue", "benchmark_attention=gpu-small",
        "--docker-image", IMAGE, "--repo", GIT_URL, "--commit", COMMIT, "--output-uri", OUTPUT_URI,
    )  # fmt: skip
    return {**built, "folder": folder, "nodes": {name: built[name]["pipeline"] for name in DAG}}


def test_each_steps_queue_is_a_pipeline_parameter(built):
    # so that a controller re-run by an agent (or from the web UI) keeps them
    assert {name: node["queue"] for name, node in built["nodes"].items()} == {
        name: f"${{pipeline.queue_{name}}}" for name in DAG
    }


def test_the_queue_parameters_are_those_of_queue_cpu_queue_and_step_queue(built):
    parameters = built["pipeline"]["parameters"]
    assert {name: parameters[f"queue_{name}"] for name in DAG} == {
        "fetch_data": "cpu",
        "train": "a100",
        "evaluate": "a100",
        "highres": "a100",
        "benchmark_attention": "gpu-small",
        "summary": "cpu",
    }


def test_the_pipeline_parameters_are_what_a_controller_run_by_an_agent_needs(built):
    assert set(built["pipeline"]["parameters"]) == {
        "data",
        "preset",
        "epochs",
        "seed",
        "init",
        "settings",
        "nodes",
        "highres_size",
        "finetune_steps",
        "benchmark",
        "output_uri",
        *(f"queue_{name}" for name in DAG),
    }  # no output folder, no mode: nothing that means nothing on an agent
    for node in built["nodes"].values():
        assert not any(key.endswith(("/output", "/mode")) for key in node["parameters"])


def test_the_output_uri_is_a_pipeline_parameter(built):
    # where the steps upload: a parameter, so that a controller re-run by an agent keeps it
    assert built["pipeline"]["parameters"]["output_uri"] == OUTPUT_URI


def test_every_step_runs_the_given_image_repository_and_commit(built):
    for name in DAG:
        task = built[name]
        assert task["container"]["image"] == IMAGE, name
        assert (task["script"]["repository"], task["script"]["version_num"]) == (GIT_URL, COMMIT), name


def test_no_step_script_connects_the_frameworks(built):
    for name in DAG:  # else every torch.save would register a model of its own
        assert "auto_connect_frameworks=False" in built[name]["script"]["diff"], name


def test_fetch_data_alone_is_cached_and_on_its_source_alone(built):
    # the cache hashes fetch_data's parameters: only the data source, the same on every run
    nodes = built["nodes"]
    assert nodes["fetch_data"]["parameters"] == {"kwargs/source": "${pipeline.data}"}
    assert [name for name, node in nodes.items() if node["cache_executed_step"]] == ["fetch_data"]


def test_the_steps_hand_on_references_to_earlier_steps_returns(built):
    nodes = built["nodes"]
    assert nodes["train"]["parameters"]["kwargs_artifacts/data"] == "${fetch_data.id}.data"
    assert nodes["highres"]["parameters"]["kwargs_artifacts/checkpoint"] == "${train.id}.checkpoint"


def test_training_takes_the_preset_and_the_initial_weights_from_the_pipeline_parameters(built):
    parameters = built["nodes"]["train"]["parameters"]
    assert parameters["kwargs/preset"] == "${pipeline.preset}"
    assert parameters["kwargs/init"] == "${pipeline.init}"  # --init, in both modes
    assert parameters["kwargs/nodes"] == "${pipeline.nodes}"  # --nodes: the machines it trains on


def test_the_pipeline_page_shows_the_results_and_the_models(built):
    nodes = built["nodes"]
    assert nodes["evaluate"]["monitor_metrics"] == [["results", "test accuracy @ training size"]]
    assert ["results", "test accuracy @ high res, fine-tuned"] in nodes["highres"]["monitor_metrics"]
    assert ["results", "best speed-up of fused over separate QKV"] in nodes["benchmark_attention"]["monitor_metrics"]
    # each model is named after its step on the step's task
    assert {name: node["monitor_models"] for name, node in nodes.items() if node["monitor_models"]} == {
        "train": ["train"],
        "highres": ["highres"],
    }


def test_every_generated_step_script_compiles(built):
    # The agent writes the stored script out as <function>.py and runs it: a `from __future__`
    # import in pipelines/steps.py, copied after ClearML's header, is a SyntaxError there.
    for name in DAG:
        script = built["folder"] / name / built[name]["script"]["entry_point"]
        assert script.read_text() == built[name]["script"]["diff"]
        compile(script.read_text(), str(script), "exec")


def test_a_step_queue_for_an_unknown_step_is_refused():
    with pytest.raises(ValueError, match="unknown steps"):
        step_queues("gpu", "cpu", {"trian": "gpu"})


def test_the_highres_size_keeps_the_papers_ratio():
    assert default_highres_size("vit-ti16-224") == 384
    assert default_highres_size("smoke") == 56  # 32 * 384 / 224, in whole patches of 8


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_leaves_nothing_half_written(tmp_path):
    import signal
    import time

    data = make_layout(tmp_path / "data", per_split=(64, 4, 4))
    command = pipeline_command(
        "--data",
        str(data),
        "--preset",
        "smoke",
        "--output",
        str(tmp_path / "run"),
        "--epochs",
        "400",
        "--benchmark",
        "quick",
    )
    run = subprocess.Popen(
        command,
        cwd=REPO,
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # As in a terminal: a test runner started in the background (`cmd &` in a script)
        # passes an ignored SIGINT down to its children, and Python then never raises Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = tmp_path / "run" / "train" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / "steps" / "train.log").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(8)  # well into training
    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130
    kept = f"the steps that finished (fetch_data) are kept in {tmp_path / 'run'}"
    assert f"interrupted: train is stopped; {kept}" in stderr
    assert (tmp_path / "run" / "fetch_data" / "fetch_data.json").is_file()
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not list((tmp_path / "run").rglob("*.tmp"))  # nothing half-written
    assert not checkpoint.exists() or checkpoints_load_ok(checkpoint)


def checkpoints_load_ok(path: Path) -> bool:
    from components.common import checkpoints

    return "model" in checkpoints.load(path)


def test_steps_take_parameters_as_an_agent_passes_them(tmp_path):
    # On an agent, pipeline parameters reach the step functions as strings.
    from pipelines import steps

    data = make_layout(tmp_path / "data", per_split=(8, 2, 2))
    fetched_data, fetched = steps.fetch_data_step(str(data), output=str(tmp_path / "run"))
    checkpoint, trained = steps.train_step(
        fetched_data, "smoke", "1", "3", "", settings="{}", nodes="1", output=str(tmp_path / "run")
    )
    assert len(trained["train_loss"]) == 1 and Path(checkpoint).is_file()
    result = steps.highres_step(checkpoint, fetched_data, "48", "2", output=str(tmp_path / "run"))
    assert result["image_size"] == 48 and len(result["finetune_losses"]) == 2


def test_server_mode_reports_a_server_that_does_not_answer_within_seconds(tmp_path):
    import time

    port = closed_port()
    env = child_environment(CLEARML_API_HOST=f"http://127.0.0.1:{port}")
    env.pop("CLEARML_OFFLINE_MODE", None)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "pipelines/run_pipeline.py", "--data", "kaggle"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and time.monotonic() - started < 30
    assert f"ClearML server at http://127.0.0.1:{port} refused the connection" in run.stderr and "--local" in run.stderr
