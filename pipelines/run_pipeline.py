"""The headgear ViT pipeline: one DAG, run by a ClearML server's agents or on this machine.

    fetch_data ──► train ──┬──► evaluate               (test accuracy at the training size)
                           └──► highres                (pos-embed resize, evaluation at 384, fine-tune)
    benchmark_attention                                (separate vs fused Q/K/V, SDPA, timm)
                  all ──► summary                      (summary.json, report.html)

Server mode (ClearML configured): a ``PipelineController`` whose steps are tasks enqueued on
``--queue`` in the Docker image of ``docker/``, run by ``clearml-agent daemon --queue gpu
--docker IMAGE``. Local mode (no server, or ``--local``): the same steps, one child process
each in DAG order, each an offline ClearML task, everything in one run folder.

    python pipelines/run_pipeline.py --data kaggle --preset vit-ti16-224
    python pipelines/run_pipeline.py --data archive.zip --preset smoke --output runs/smoke --local
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: make `components`, `model`, `pipelines` importable

from components.presets import PRESETS  # noqa: E402
from components.tracking import PROJECT, TrackingError, check_server, child_environment, server_configured  # noqa: E402
from model import MODEL_PRESETS  # noqa: E402
from pipelines import steps  # noqa: E402

DEFAULT_IMAGE = "headgear-vit:latest"


@dataclass(frozen=True)
class Step:
    function: Callable
    kwargs: dict  # plain values, "${pipeline.NAME}" parameters, or "${STEP.RETURN}" outputs of earlier steps
    returns: tuple[str, ...]
    parents: tuple[str, ...] = ()


OUT = "${pipeline.output}"
DAG: dict[str, Step] = {
    "fetch_data": Step(
        steps.fetch_data_step, {"source": "${pipeline.data}", "output": OUT}, returns=("data", "result")
    ),
    "train": Step(
        steps.train_step,
        {
            "data": "${fetch_data.data}",
            "preset": "${pipeline.preset}",
            "epochs": "${pipeline.epochs}",
            "seed": "${pipeline.seed}",
            "output": OUT,
        },
        returns=("checkpoint", "result"),
        parents=("fetch_data",),
    ),
    "evaluate": Step(
        steps.evaluate_step,
        {"checkpoint": "${train.checkpoint}", "data": "${fetch_data.data}", "output": OUT},
        returns=("result",),
        parents=("fetch_data", "train"),
    ),
    "highres": Step(
        steps.highres_step,
        {
            "checkpoint": "${train.checkpoint}",
            "data": "${fetch_data.data}",
            "image_size": "${pipeline.highres_size}",
            "finetune_steps": "${pipeline.finetune_steps}",
            "output": OUT,
        },
        returns=("result",),
        parents=("fetch_data", "train"),
    ),
    "benchmark_attention": Step(
        steps.benchmark_step, {"mode": "${pipeline.benchmark}", "output": OUT}, returns=("result",)
    ),
    "summary": Step(
        steps.summary_step,
        {
            "mode": "${pipeline.mode}",
            "preset": "${pipeline.preset}",
            "fetched": "${fetch_data.result}",
            "trained": "${train.result}",
            "evaluated": "${evaluate.result}",
            "highres": "${highres.result}",
            "benchmark": "${benchmark_attention.result}",
            "output": OUT,
        },
        returns=("result",),
        parents=("fetch_data", "train", "evaluate", "highres", "benchmark_attention"),
    ),
}

PARAMETER_HELP = {
    "data": "'kaggle', or a zip / folder in the headgear layout, or a ClearML Dataset id",
    "preset": f"training preset: {', '.join(PRESETS)}",
    "epochs": "training epochs; 0 keeps the preset's",
    "seed": "random seed of the training run",
    "highres_size": "image size of the high-resolution evaluation",
    "finetune_steps": "SGD steps of the fine-tune at the high resolution; 0 skips it",
    "benchmark": "attention benchmark sweep: auto (full on a GPU, quick on a CPU), quick or full",
    "output": "folder for the steps' outputs (on the machine that runs each step)",
    "mode": "local or server",
}
REFERENCE = re.compile(r"^\$\{(\w+)\.(\w+)\}$")


def default_highres_size(preset: str) -> int:
    """384 for a preset at 224; for others, the same 384/224 ratio rounded to the patch size."""
    config = PRESETS[preset]
    patch = config.patch_size or MODEL_PRESETS[config.model]["patch_size"]
    return max(1, round(config.image_size * 384 / 224 / patch)) * patch


# --- local mode ---------------------------------------------------------------------------------


def resolve(kwargs: dict, params: dict, outputs: dict[str, dict]) -> dict:
    """Replaces ClearML's ``${pipeline.X}`` and ``${STEP.RETURN}`` references by their values."""
    resolved = {}
    for name, value in kwargs.items():
        match = REFERENCE.match(value) if isinstance(value, str) else None
        if match:
            source, key = match.groups()
            value = params[key] if source == "pipeline" else outputs[source][key]
        resolved[name] = value
    return resolved


def run_step(name: str, step: Step, kwargs: dict, run_dir: Path) -> tuple[dict | None, str]:
    """Runs one step in a child process, its output shown and kept in ``steps/NAME.log``.
    Returns (its named outputs, or None if it failed; the end of its log)."""
    folder = run_dir / "steps"
    folder.mkdir(parents=True, exist_ok=True)
    kwargs_path, result_path, log_path = (folder / f"{name}{suffix}" for suffix in (".kwargs.json", ".json", ".log"))
    kwargs_path.write_text(json.dumps(kwargs, indent=2))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pipelines.steps", step.function.__name__, str(kwargs_path), str(result_path)]
    env = child_environment(CLEARML_OFFLINE_MODE="1", PYTHONUNBUFFERED="1")
    tail = b""
    with log_path.open("wb") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            while chunk := child.stdout.read1(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
                tail = (tail + chunk)[-4000:]
            child.wait()
        except KeyboardInterrupt:
            child.terminate()  # it got the Ctrl-C too; make sure it is gone before we leave
            child.wait()
            raise
    if child.returncode != 0 or not result_path.is_file():
        return None, tail.decode("utf-8", "replace")
    return dict(zip(step.returns, json.loads(result_path.read_text()))), ""


def run_local(params: dict, run_dir: Path) -> int:
    """The DAG in order, each step in its own process; a failed step skips its dependents."""
    outputs: dict[str, dict] = {}
    status: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name, step in DAG.items():
        if any(status.get(parent) != "completed" for parent in step.parents):
            status[name] = "skipped"
            continue
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        result, error = run_step(name, step, resolve(step.kwargs, params, outputs), run_dir)
        seconds = time.monotonic() - started
        if result is None:
            status[name], failures[name] = f"FAILED after {seconds:.0f} s", error
        else:
            status[name], outputs[name] = "completed", result
            print(f"=== {name}: completed in {seconds:.0f} s ===", flush=True)
    print("\nsteps:")
    for name in DAG:
        print(f"  {name:<20} {status[name]}")
    for name, error in failures.items():
        last_lines = "\n".join(error.strip().splitlines()[-15:])
        print(f"\nstep {name} failed (full log: {run_dir / 'steps' / f'{name}.log'}):\n{last_lines}", file=sys.stderr)
    return 1 if failures else 0


# --- server mode --------------------------------------------------------------------------------


def git_source() -> tuple[str, str]:
    """The remote URL and commit of this checkout: what the agents clone and run."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else ""

    url, commit = git("remote", "get-url", "origin"), git("rev-parse", "HEAD")
    if not url or not commit:
        raise ValueError(
            "server mode runs the steps from a git repository the agents can clone: push this "
            "checkout to a remote (origin) or pass --repo URL --commit SHA"
        )
    if git("status", "--porcelain", "--untracked-files=no"):
        print(f"note: uncommitted changes are not run by the agents; they run commit {commit[:10]}")
    return url, commit


def build_controller(params: dict, queue: str, docker_image: str, step_queues: dict[str, str], repo: str, commit: str):
    """The ``PipelineController`` of the DAG, built but not started."""
    from clearml import PipelineController

    unknown = set(step_queues) - set(DAG)
    if unknown:
        raise ValueError(f"--step-queue names unknown steps {sorted(unknown)}; the steps are {', '.join(DAG)}")
    pipe = PipelineController(
        name="headgear-vit",
        project=PROJECT,
        version="1.0.0",
        add_pipeline_tags=True,
        docker=docker_image,
        packages=str(REPO / "requirements.txt"),
    )
    pipe.set_default_execution_queue(queue)
    for name, value in params.items():
        pipe.add_parameter(name, value, PARAMETER_HELP[name])
    for name, step in DAG.items():
        pipe.add_function_step(
            name=name,
            function=step.function,
            function_kwargs=step.kwargs,
            function_return=list(step.returns),
            parents=list(step.parents),
            execution_queue=step_queues.get(name, queue),
            docker=docker_image,
            repo=repo,  # agents clone it and run the step at its root, where `components` imports from
            repo_commit=commit,
            packages=str(REPO / "requirements.txt"),
            cache_executed_step=name == "fetch_data",  # the same source: the same data version, reused
            task_type="training" if name == "train" else None,
        )
    return pipe


def run_server(args: argparse.Namespace, params: dict) -> int:
    host = check_server()
    repo, commit = (args.repo, args.commit) if args.repo else git_source()
    queue, docker_image = args.queue, args.docker_image
    pipe = build_controller(params, queue, docker_image, args.step_queue, repo, commit or None)
    from clearml import Task

    print(f"pipeline on {host}: {Task.current_task().get_output_log_web_page()}")
    print(f"steps go to the queue {queue!r}; an agent takes them with:")
    print(f"  clearml-agent daemon --queue {queue} --docker {docker_image} --gpus all")
    if args.controller_queue:
        pipe.start(queue=args.controller_queue)
    else:
        pipe.start_locally(run_pipeline_steps_locally=False)
    return 0


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="kaggle", help=f"{PARAMETER_HELP['data']} (default: kaggle)")
    parser.add_argument(
        "--preset", default="vit-ti16-224", choices=list(PRESETS), help="training preset (default: vit-ti16-224)"
    )
    parser.add_argument("--output", type=Path, default=None, help="run folder (default: runs/<date-time>)")
    parser.add_argument(
        "--local", action="store_true", help="run here with ClearML offline, even if a server is configured"
    )
    parser.add_argument("--queue", default="gpu", help="agent queue of the steps in server mode (default: gpu)")
    parser.add_argument(
        "--step-queue",
        action="append",
        default=[],
        metavar="STEP=QUEUE",
        help="another queue for one step, e.g. benchmark_attention=gpu-h100 (repeatable)",
    )
    parser.add_argument(
        "--docker-image", default=DEFAULT_IMAGE, help=f"image the agents run the steps in (default: {DEFAULT_IMAGE})"
    )
    parser.add_argument("--controller-queue", default=None, help="run the controller on this queue instead of here")
    parser.add_argument("--repo", default=None, help="git URL the agents clone (default: this checkout's origin)")
    parser.add_argument("--commit", default=None, help="commit the agents run, with --repo (default: its HEAD)")
    parser.add_argument("--epochs", type=int, default=0, help=PARAMETER_HELP["epochs"])
    parser.add_argument("--seed", type=int, default=0, help="random seed of the training run (default: 0)")
    parser.add_argument(
        "--highres-size",
        type=int,
        default=None,
        help="size of the high-resolution evaluation (default: 384 for 224 presets, the same ratio for others)",
    )
    parser.add_argument(
        "--finetune-steps", type=int, default=300, help=f"{PARAMETER_HELP['finetune_steps']} (default: 300)"
    )
    parser.add_argument(
        "--benchmark", default="auto", choices=["auto", "quick", "full"], help=PARAMETER_HELP["benchmark"]
    )
    args = parser.parse_args(argv)
    try:
        args.step_queue = dict(item.split("=", 1) for item in args.step_queue)
    except ValueError:
        parser.error("--step-queue takes STEP=QUEUE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "local" if args.local or not server_configured() else "server"
    output = args.output or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if mode == "local":
        output = output.resolve()
        os.environ["CLEARML_OFFLINE_MODE"] = "1"
    params = {
        "data": str(Path(args.data).resolve()) if mode == "local" and Path(args.data).exists() else args.data,
        "preset": args.preset,
        "epochs": args.epochs,
        "seed": args.seed,
        "highres_size": args.highres_size or default_highres_size(args.preset),
        "finetune_steps": args.finetune_steps,
        "benchmark": args.benchmark,
        "output": str(output),
        "mode": mode,
    }
    try:
        if mode == "server":
            return run_server(args, params)
        print(f"local run into {output} (ClearML offline; no server configured or --local)")
        return run_local(params, output)
    except (TrackingError, ValueError) as error:
        print(f"run_pipeline: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the steps that finished are kept in {output}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
