"""The pipeline: the local run end to end, the server-mode wiring (built, not started: no server
can run here), and a failing step."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.tracking import child_environment
from pipelines.run_pipeline import DAG, build_controller, default_highres_size
from tests.conftest import REPO, SHAPE_CLASSES, SHAPES_PER_SPLIT, closed_port, make_layout
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


@pytest.mark.slow
def test_the_local_run_end_to_end(shapes_zip, tmp_path):
    run = run_pipeline(
        "--data", str(shapes_zip), "--preset", "smoke", "--output", str(tmp_path), "--finetune-steps", "30"
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["mode"] == "local"

    # summary.json says what the steps wrote, nothing else
    fetched = json.loads((tmp_path / "fetch_data" / "fetch_data.json").read_text())
    trained = json.loads((tmp_path / "train" / "train.json").read_text())
    evaluated = json.loads((tmp_path / "evaluate" / "evaluate.json").read_text())
    highres = json.loads((tmp_path / "highres" / "highres.json").read_text())
    benchmark = json.loads((tmp_path / "benchmark_attention" / "benchmark.json").read_text())
    assert summary["dataset"] == {
        "source": str(shapes_zip),
        "version": fetched["version"],
        "classes": fetched["classes"],
        "counts": {split: n * len(SHAPE_CLASSES) for split, n in SHAPES_PER_SPLIT.items()},
    }
    assert summary["train"] == {
        "preset": "smoke",
        "epochs": 10,  # the smoke preset's
        "image_size": 32,
        "train_loss": trained["train_loss"],
        "val_accuracy": trained["val_accuracy"],
        "checkpoint": trained["checkpoint"],
    }
    assert summary["evaluate"] == {
        "image_size": 32,
        "test_accuracy": evaluated["test_accuracy"],
        "test_loss": evaluated["test_loss"],
    }
    assert summary["highres"] == {
        "image_size": 56,
        **{
            k: highres[k]
            for k in (
                "test_accuracy_bilinear",
                "test_accuracy_bicubic",
                "test_accuracy_bicubic_calibrated",
                "attention_scale",
                "test_accuracy_finetuned",
                "finetune_kept",
                "test_accuracy_finetuned_interpolated",
            )
        },
    }
    assert summary["benchmark"]["rows"] == benchmark["rows"] and len(benchmark["rows"]) == 16
    assert summary["evaluate"]["test_accuracy"] > 0.3  # it learned: chance is 0.1
    assert trained["train_loss"][-1] < trained["train_loss"][0]

    # every step left an offline session that holds what it reported
    sessions = summary["clearml"]
    assert set(sessions) == {"fetch_data", "train", "evaluate", "highres", "benchmark_attention", "summary"}
    assert all(Path(path).is_file() for path in sessions.values())
    assert scalars(read_session(sessions["train"]), "loss", "train") == pytest.approx(trained["train_loss"])
    assert scalars(read_session(sessions["evaluate"]), "accuracy", "test @ 32") == [evaluated["test_accuracy"]]
    assert len(scalars(read_session(sessions["highres"]), "fine-tune loss", "train @ 56")) == 30

    # the report: every plot inline with its caption, nothing fetched from outside the file, what ran
    report = (tmp_path / "report.html").read_text()  # curves, confusion, 384 bars, 2 curves, pos-embed, benchmark
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", report)
    assert len(sources) == 7 and all(source.startswith("data:image/png;base64,") for source in sources)
    assert not re.search(r"<link|<script|<iframe|url\(|@import", report)
    captions = [plot["caption"] for step in (trained, evaluated, highres, benchmark) for plot in step["plots"]]
    assert len(captions) == 7
    assert all(f"<figcaption>{html.escape(caption)}</figcaption>" in report for caption in captions)
    assert "clearml-task --import-offline-session" in report and "<dt>seed</dt><dd>0</dd>" in report
    assert all(fact in report for fact in (fetched["version"], trained["device"], f"torch {torch.__version__}"))
    assert "test accuracy @ 56, bicubic + fine-tuned" in run.stdout  # the table on stdout
    assert f"fine-tuned, x{highres['finetune_kept']:.2f} of its change kept" in run.stdout


def test_a_failing_step_skips_its_dependents_and_keeps_what_finished(tmp_path):
    data = make_layout(tmp_path / "data", per_split=(16, 4, 4))
    run = run_pipeline(
        "--data",
        str(data),
        "--preset",
        "smoke",
        "--output",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--highres-size",
        "50",
        "--benchmark",
        "quick",
    )
    assert run.returncode == 1
    status = dict(line.split(maxsplit=1) for line in run.stdout.split("steps:\n")[-1].strip().splitlines())
    assert status["fetch_data"] == status["train"] == status["evaluate"] == "completed"
    assert status["highres"].startswith("FAILED") and status["summary"] == "skipped"
    assert "not divisible by the patch size 8" in run.stderr  # the step's own error, on the console
    assert (tmp_path / "run" / "evaluate" / "evaluate.json").is_file()  # completed outputs are kept
    assert (tmp_path / "run" / "train" / "checkpoints" / "best.pt").is_file()
    assert not (tmp_path / "run" / "summary.json").exists()


DESCRIBE_CONTROLLER = """
import json, sys
import tests.conftest  # offline ClearML, as in every test
from pipelines.run_pipeline import build_controller
params = json.loads(sys.argv[1])
pipe = build_controller(params, "gpu", "registry.example/headgear-vit:1", {"benchmark_attention": "gpu-small"},
                        repo="https://git.example/headgear-vit.git", commit="0123abc")
nodes = {name: {"parents": node.parents, "queue": node.queue, "docker": node.explicit_docker_image,
                "cache": node.cache_executed_step, "parameters": node.parameters} for name, node in pipe._nodes.items()}
print("CONTROLLER " + json.dumps({"nodes": nodes, "parameters": pipe.get_parameters()}))
"""


def test_the_server_mode_controller_has_the_dag_queues_image_and_parameters(tmp_path):
    # Built offline and never started: no ClearML server can run here, and none is needed to
    # check what would be sent to one. In a script of its own, as run_pipeline.py builds it
    # (under pytest, ClearML would spend minutes analysing pytest as the controller's script).
    params = {
        "data": "kaggle",
        "preset": "vit-ti16-224",
        "epochs": 0,
        "seed": 0,
        "highres_size": 384,
        "finetune_steps": 300,
        "benchmark": "auto",
        "output": "runs/pipeline",
        "mode": "server",
    }
    script = tmp_path / "describe_controller.py"
    script.write_text(DESCRIBE_CONTROLLER)
    run = subprocess.run(
        [sys.executable, str(script), json.dumps(params)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=child_environment(PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout.split("CONTROLLER ", 1)[1].splitlines()[0])
    nodes = built["nodes"]
    assert list(nodes) == list(DAG) == ["fetch_data", "train", "evaluate", "highres", "benchmark_attention", "summary"]
    assert nodes["train"]["parents"] == ["fetch_data"]
    assert set(nodes["evaluate"]["parents"]) == set(nodes["highres"]["parents"]) == {"fetch_data", "train"}
    assert nodes["benchmark_attention"]["parents"] == []
    assert set(nodes["summary"]["parents"]) == {"fetch_data", "train", "evaluate", "highres", "benchmark_attention"}
    assert {name: node["queue"] for name, node in nodes.items()} == {
        "fetch_data": "gpu",
        "train": "gpu",
        "evaluate": "gpu",
        "highres": "gpu",
        "benchmark_attention": "gpu-small",
        "summary": "gpu",
    }
    assert {node["docker"] for node in nodes.values()} == {"registry.example/headgear-vit:1"}
    assert nodes["fetch_data"]["cache"] and not nodes["train"]["cache"]
    assert built["parameters"] == params  # editable in the web UI
    assert nodes["train"]["parameters"]["kwargs/preset"] == "${pipeline.preset}"
    assert nodes["train"]["parameters"]["kwargs_artifacts/data"] == "${fetch_data.id}.data"
    assert nodes["highres"]["parameters"]["kwargs_artifacts/checkpoint"] == "${train.id}.checkpoint"


def test_a_step_queue_for_an_unknown_step_is_refused():
    with pytest.raises(ValueError, match="unknown steps"):
        build_controller({}, "gpu", "image", {"trian": "gpu"}, repo="https://git.example/x.git", commit="abc")


def test_the_highres_size_keeps_the_papers_ratio():
    assert default_highres_size("vit-ti16-224") == 384
    assert default_highres_size("smoke") == 56  # 32 * 384 / 224, in whole patches of 8


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
    assert "interrupted: the steps that finished are kept" in stderr
    assert (tmp_path / "run" / "fetch_data" / "fetch_data.json").is_file()
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not list((tmp_path / "run").rglob("*.tmp"))  # nothing half-written
    assert not checkpoint.exists() or checkpoints_load_ok(checkpoint)


def checkpoints_load_ok(path: Path) -> bool:
    from components import checkpoints

    return "model" in checkpoints.load(path)


def test_steps_take_parameters_as_an_agent_passes_them(tmp_path):
    # On an agent, pipeline parameters reach the step functions as strings.
    from pipelines import steps

    data = make_layout(tmp_path / "data", per_split=(8, 2, 2))
    fetched_data, fetched = steps.fetch_data_step(str(data), str(tmp_path / "run"))
    checkpoint, trained = steps.train_step(fetched_data, "smoke", "1", "3", str(tmp_path / "run"))
    assert len(trained["train_loss"]) == 1 and Path(checkpoint).is_file()
    (result,) = steps.highres_step(checkpoint, fetched_data, "48", "2", str(tmp_path / "run"))
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
    assert f"ClearML server at http://127.0.0.1:{port} did not answer" in run.stderr and "--local" in run.stderr
