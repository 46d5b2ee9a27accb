"""The headgear ViT pipeline: one DAG, run by a ClearML server's agents or on this machine.

    fetch_data ──► train ──┬──► evaluate               (test accuracy at the training size)
                           └──► highres                (pos-embed resize, evaluation at 384, fine-tune)
    benchmark_attention                                (separate vs fused Q/K/V, SDPA, timm)
                  all ──► summary                      (summary.json, report.html)

Server mode (ClearML configured): a ``PipelineController`` whose steps are tasks enqueued on
``--queue`` (``--cpu-queue`` for the steps without a GPU) in the Docker image of ``docker/``,
run by ``clearml-agent daemon --queue gpu --docker IMAGE``; the steps hand each other ClearML
ids (Dataset, model, artifacts), never paths. ``--dry-run DIR`` builds it offline and writes
what each agent will run. Local mode (no server, or ``--local``): the same steps, one child
process each in DAG order, each an offline ClearML task, everything in one run folder.

    python pipelines/run_pipeline.py --data kaggle --preset vit-ti16-224
    python pipelines/run_pipeline.py --dry-run runs/dry --data kaggle
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

from components import cli  # noqa: E402
from components.data import check_source  # noqa: E402
from components.presets import PRESETS, ConfigError  # noqa: E402
from components.tracking import PROJECT, check_server, child_environment, server_configured  # noqa: E402
from model import ATTENTION_IMPLEMENTATIONS, MODEL_PRESETS  # noqa: E402
from pipelines import steps  # noqa: E402
from pipelines.terminal_log import TerminalLog  # noqa: E402

DEFAULT_IMAGE = "headgear-vit:latest"


@dataclass(frozen=True)
class Step:
    function: Callable
    kwargs: dict  # plain values, "${pipeline.NAME}" parameters, or "${STEP.RETURN}" outputs of earlier steps
    returns: tuple[str, ...]
    parents: tuple[str, ...] = ()
    task_type: str = "custom"  # ClearML's task type, shown and filtered on in the web UI
    gpu: bool = True  # False: enqueued on --cpu-queue
    monitor_metrics: tuple[tuple[str, str], ...] = ()  # shown on the pipeline's own page
    monitor_models: tuple[str, ...] = ()


RESULTS = "results"  # the title of the scalars the steps report for the pipeline page (pipelines/steps.py)
DAG: dict[str, Step] = {
    "fetch_data": Step(
        steps.fetch_data_step,
        {"source": "${pipeline.data}"},
        returns=("data", "result"),
        task_type="data_processing",
        gpu=False,
    ),
    "train": Step(
        steps.train_step,
        {
            "data": "${fetch_data.data}",
            "preset": "${pipeline.preset}",
            "epochs": "${pipeline.epochs}",
            "seed": "${pipeline.seed}",
            "init": "${pipeline.init}",
        },
        returns=("checkpoint", "result"),
        parents=("fetch_data",),
        task_type="training",
        monitor_models=("*",),
    ),
    "evaluate": Step(
        steps.evaluate_step,
        {"checkpoint": "${train.checkpoint}", "data": "${fetch_data.data}"},
        returns=("result",),
        parents=("fetch_data", "train"),
        task_type="testing",
        monitor_metrics=((RESULTS, "test accuracy @ training size"),),
    ),
    "highres": Step(
        steps.highres_step,
        {
            "checkpoint": "${train.checkpoint}",
            "data": "${fetch_data.data}",
            "image_size": "${pipeline.highres_size}",
            "finetune_steps": "${pipeline.finetune_steps}",
        },
        returns=("result",),
        parents=("fetch_data", "train"),
        task_type="testing",
        monitor_metrics=(
            (RESULTS, "test accuracy @ high res, bicubic"),
            (RESULTS, "test accuracy @ high res, fine-tuned"),
        ),
        monitor_models=("*",),
    ),
    "benchmark_attention": Step(
        steps.benchmark_step,
        {"sweep": "${pipeline.benchmark}"},
        returns=("result",),
        task_type="qc",
        monitor_metrics=tuple(
            (RESULTS, f"best speed-up of {impl} over separate QKV") for impl in ATTENTION_IMPLEMENTATIONS[1:]
        ),
    ),
    "summary": Step(
        steps.summary_step,
        {
            "preset": "${pipeline.preset}",
            "fetched": "${fetch_data.result}",
            "trained": "${train.result}",
            "evaluated": "${evaluate.result}",
            "highres": "${highres.result}",
            "benchmark": "${benchmark_attention.result}",
        },
        returns=("result",),
        parents=("fetch_data", "train", "evaluate", "highres", "benchmark_attention"),
        gpu=False,
    ),
}
# What only the local runner passes: on an agent each step writes into its own clone, and the
# summary step's mode defaults to "server" (neither is a parameter to edit in the web UI).
LOCAL_KWARGS = {"summary": {"mode": "local"}}

PARAMETER_HELP = {
    "data": "'kaggle', or a zip / folder in the headgear layout, or a ClearML Dataset id",
    "preset": f"training preset: {', '.join(PRESETS)}",
    "epochs": "training epochs; 0 keeps the preset's",
    "seed": "random seed of the training run",
    "init": "initial weights: timm:<model name>, or a ClearML model id (server mode) or a .pt file (local mode); "
    "empty: the preset's",
    "highres_size": "image size of the high-resolution evaluation",
    "finetune_steps": "SGD steps of the fine-tune at the high resolution; 0 skips it",
    "benchmark": "attention benchmark sweep: auto (full on a GPU, quick on a CPU), quick or full",
    **{f"queue_{name}": f"agent queue the {name} step is enqueued on" for name in DAG},
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
    with TerminalLog(log_path.open("wb")) as log:
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
    step_seconds: dict[str, float] = {}  # of the completed steps, for the report
    status: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name, step in DAG.items():
        if any(status.get(parent) != "completed" for parent in step.parents):
            status[name] = "skipped"
            continue
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        kwargs = {**resolve(step.kwargs, params, outputs), **LOCAL_KWARGS.get(name, {}), "output": str(run_dir)}
        if name == "summary":
            kwargs["step_seconds"] = step_seconds
        result, error = run_step(name, step, kwargs, run_dir)
        seconds = time.monotonic() - started
        if result is None:
            status[name], failures[name] = f"FAILED after {seconds:.0f} s", error
        else:
            status[name], outputs[name], step_seconds[name] = "completed", result, seconds
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
        raise ConfigError(
            "server mode runs the steps from a git repository the agents can clone: push this "
            "checkout to a remote (origin) or pass --repo URL --commit SHA"
        )
    if git("status", "--porcelain", "--untracked-files=no"):
        print(f"note: uncommitted changes are not run by the agents; they run commit {commit[:10]}")
    return url, commit


def step_queues(queue: str, cpu_queue: str, overrides: dict[str, str]) -> dict[str, str]:
    """The queue of every step: ``overrides`` (``--step-queue``), else ``cpu_queue`` for the
    steps that need no GPU and ``queue`` for the others."""
    unknown = set(overrides) - set(DAG)
    if unknown:
        raise ConfigError(f"--step-queue names unknown steps {sorted(unknown)}; the steps are {', '.join(DAG)}")
    return {name: overrides.get(name, queue if step.gpu else cpu_queue) for name, step in DAG.items()}


def build_controller(
    params: dict, queues: dict[str, str], docker_image: str, repo: str, commit: str, output_uri: str | bool = True
):
    """The ``PipelineController`` of the DAG, built but not started. ``params`` become the
    pipeline's parameters (editable in the web UI, kept when an agent re-runs the controller),
    and so does each step's queue (``queue_<step>``); ``output_uri`` is where the steps upload
    models and artifacts (True: the server's file server)."""
    from clearml import PipelineController

    pipe = PipelineController(
        name="headgear-vit",
        project=PROJECT,
        version="1.0.0",
        add_pipeline_tags=True,
        docker=docker_image,
        packages=str(REPO / "requirements.txt"),
        output_uri=output_uri,
    )
    for name, value in {**params, **{f"queue_{step}": queue for step, queue in queues.items()}}.items():
        pipe.add_parameter(name, value, PARAMETER_HELP[name])
    for name, step in DAG.items():
        pipe.add_function_step(
            name=name,
            function=step.function,
            function_kwargs=dict(step.kwargs),
            function_return=list(step.returns),
            parents=list(step.parents),
            task_type=step.task_type,
            execution_queue=f"${{pipeline.queue_{name}}}",
            docker=docker_image,
            repo=repo,  # agents clone it and run the step at its root, where `components` imports from
            repo_commit=commit,
            packages=str(REPO / "requirements.txt"),
            auto_connect_frameworks=False,  # models are registered explicitly, never by torch.save hooks
            auto_connect_arg_parser=False,
            cache_executed_step=name == "fetch_data",  # the same source: the same data version, reused
            monitor_metrics=list(step.monitor_metrics),
            monitor_models=list(step.monitor_models),
        )
    return pipe


def upload_local_data(source: str) -> str:
    """A zip or folder on this machine, prepared and registered as a ClearML Dataset (one per
    content: a re-run with the same data reuses it); returns the Dataset's id, which is what the
    agents, on other machines, can fetch."""
    from components.data import resolve
    from components.tracking import register_dataset

    dataset_id = register_dataset(resolve(source))
    print(f"data {source} is the ClearML Dataset {dataset_id}")
    return dataset_id


def dry_run(pipe, folder: Path) -> None:
    """Writes what each agent will run: ``folder/<step>/task.json`` (the task definition the
    controller stores for the step, with the queue, parents and parameters it launches it
    with), ``folder/<step>/<function>.py`` (the script ClearML generated for the step) and
    ``folder/pipeline.json`` (the pipeline's parameters, as the web UI shows them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.json").write_text(json.dumps({"parameters": pipe.get_parameters()}, indent=2))
    for name, node in pipe._nodes.items():
        definition = json.loads(pipe._task._get_configuration_text(name=name))
        definition["pipeline"] = {
            "queue": node.queue,
            "parents": node.parents,
            "parameters": node.parameters,
            "cache_executed_step": node.cache_executed_step,
            "output_uri": node.output_uri,
            "monitor_metrics": node.monitor_metrics,
            "monitor_models": node.monitor_models,
        }
        step_folder = folder / name
        step_folder.mkdir(parents=True, exist_ok=True)
        (step_folder / "task.json").write_text(json.dumps(definition, indent=2, default=str))
        (step_folder / definition["script"]["entry_point"]).write_text(definition["script"]["diff"])
    print(f"dry run: what each step runs is in {folder}/<step>/ (task.json and the generated script)")


def run_server(args: argparse.Namespace, params: dict) -> int:
    if not args.dry_run:
        host = check_server()
    repo, commit = (args.repo, args.commit) if args.repo else git_source()
    queues = step_queues(args.queue, args.cpu_queue or args.queue, args.step_queue)
    if Path(params["data"]).exists():
        params["data"] = (
            "<the ClearML Dataset of the local data>" if args.dry_run else upload_local_data(params["data"])
        )
    pipe = build_controller(params, queues, args.docker_image, repo, commit or None, args.output_uri or True)
    if args.dry_run:
        dry_run(pipe, args.dry_run)
        return 0
    from clearml import Task

    print(f"pipeline on {host}: {Task.current_task().get_output_log_web_page()}")
    for queue in sorted(set(queues.values())):
        print(f"steps go to the queue {queue!r}; an agent takes them with:")
        print(f"  clearml-agent daemon --queue {queue} --docker {args.docker_image} --gpus all")
    if args.controller_queue:
        pipe.start(queue=args.controller_queue)
    else:
        pipe.start_locally(run_pipeline_steps_locally=False)
    return 0


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("run_pipeline", __doc__)
    parser.add_argument("--data", default="kaggle", help=f"{PARAMETER_HELP['data']} (default: kaggle)")
    parser.add_argument(
        "--preset", default="vit-ti16-224", choices=list(PRESETS), help="training preset (default: vit-ti16-224)"
    )
    parser.add_argument(
        "--output",
        type=cli.output_folder,
        default=None,
        help="run folder of the local mode (default: runs/<date-time>)",
    )
    parser.add_argument(
        "--local", action="store_true", help="run here with ClearML offline, even if a server is configured"
    )
    parser.add_argument("--queue", default="gpu", help="agent queue of the GPU steps in server mode (default: gpu)")
    parser.add_argument(
        "--cpu-queue",
        default=None,
        help="agent queue of fetch_data and summary, which need no GPU (default: the same as --queue)",
    )
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
    parser.add_argument(
        "--output-uri",
        default=None,
        help="where the steps upload models and artifacts, e.g. s3://bucket/headgear "
        "(default: the server's file server)",
    )
    parser.add_argument(
        "--dry-run",
        type=Path,
        default=None,
        metavar="DIR",
        help="build the server-mode pipeline with ClearML offline and write what each step will run into "
        "DIR/<step>/ (task.json and the generated script), without contacting a server",
    )
    parser.add_argument("--repo", default=None, help="git URL the agents clone (default: this checkout's origin)")
    parser.add_argument("--commit", default=None, help="commit the agents run, with --repo (default: its HEAD)")
    parser.add_argument("--epochs", type=cli.nonnegative_int, default=0, help=PARAMETER_HELP["epochs"])
    parser.add_argument(
        "--seed", type=cli.nonnegative_int, default=0, help="random seed of the training run (default: 0)"
    )
    parser.add_argument("--init", default="", metavar="SOURCE", help=PARAMETER_HELP["init"])
    parser.add_argument(
        "--highres-size",
        type=cli.positive_int,
        default=None,
        help="size of the high-resolution evaluation (default: 384 for 224 presets, the same ratio for others)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=cli.nonnegative_int,
        default=300,
        help=f"{PARAMETER_HELP['finetune_steps']} (default: 300)",
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


def check_inputs(params: dict, mode: str) -> None:
    """Refuses, in seconds and before the first step, a data source or an initial-weights source
    the steps could not use."""
    if mode == "local" or Path(params["data"]).exists():  # in server mode anything else names a ClearML Dataset
        check_source(params["data"], allow_kaggle=True)
    init = params["init"]
    if init and not init.startswith("timm:"):
        if mode == "server" and Path(init).exists():
            raise ConfigError(
                f"--init {init}: a file on this machine does not reach the agents; register it as a ClearML model "
                f"and pass its id, or pass timm:<model name>"
            )
        if mode == "local" and not Path(init).is_file():
            raise ConfigError(f"--init {init}: no such file; pass a .pt file, or timm:<model name>")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CLEARML_OFFLINE_MODE"] = "1"
        mode = "server"
    else:
        mode = "local" if args.local or not server_configured() else "server"
    output = (args.output or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    if mode == "local":
        os.environ["CLEARML_OFFLINE_MODE"] = "1"
    params = {
        "data": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
        "preset": args.preset,
        "epochs": args.epochs,
        "seed": args.seed,
        "init": str(Path(args.init).resolve()) if args.init and Path(args.init).exists() else args.init,
        "highres_size": args.highres_size or default_highres_size(args.preset),
        "finetune_steps": args.finetune_steps,
        "benchmark": args.benchmark,
    }
    try:
        check_inputs(params, mode)
        if mode == "server":
            return run_server(args, params)
        print(f"local run into {output} (ClearML offline; no server configured or --local)")
        return run_local(params, output)
    except cli.INPUT_ERRORS as error:
        print(f"run_pipeline: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the steps that finished are kept in {output}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
