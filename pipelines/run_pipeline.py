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
import sys
from datetime import datetime
from pathlib import Path

from components.common import cli, tracking
from components.common.data import KAGGLE, check_source, resolve
from components.common.errors import INPUT_ERRORS, ConfigError, first_line
from components.common.init_weights import check_timm_source
from components.common.presets import HIGHRES_SIZE, PRESETS, FinetuneConfig, architecture, check_image_size, preset
from components.fetch_data import check_kaggle_credentials
from pipelines import server
from pipelines.dag import PARAMETER_HELP, default_highres_size
from pipelines.local import run_local
from pipelines.server import SERVER_PARAMETER_HELP

# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("run_pipeline", __doc__)
    add_run_flags(parser.add_argument_group("what the pipeline computes"))
    add_placement_flags(parser.add_argument_group("where it runs"))
    args = parser.parse_args(argv)
    try:
        args.step_queue = dict(item.split("=", 1) for item in args.step_queue)
    except ValueError:
        parser.error("--step-queue takes STEP=QUEUE")
    return args


def add_run_flags(group) -> None:
    group.add_argument("--data", default=KAGGLE, help=f"{PARAMETER_HELP['data']} (default: {KAGGLE})")
    group.add_argument(
        "--preset", default="vit-ti16-224", choices=list(PRESETS), help="training preset (default: vit-ti16-224)"
    )
    group.add_argument("--epochs", type=cli.nonnegative_int, default=0, help=PARAMETER_HELP["epochs"])
    group.add_argument("--seed", type=cli.nonnegative_int, default=0, help=f"{PARAMETER_HELP['seed']} (default: 0)")
    group.add_argument("--init", default="", metavar="SOURCE", help=PARAMETER_HELP["init"])
    group.add_argument("--params", type=Path, default=None, metavar="FILE", help=PARAMETER_HELP["settings"])
    group.add_argument(
        "--nodes", type=cli.positive_int, default=1, help=f"{PARAMETER_HELP['nodes']}; server mode (default: 1)"
    )
    group.add_argument(
        "--highres-size",
        type=cli.positive_int,
        default=None,
        help=f"size of the high-resolution evaluation (default: {HIGHRES_SIZE} for 224 presets, the same ratio for "
        f"others)",
    )
    group.add_argument(
        "--finetune-steps",
        type=cli.nonnegative_int,
        default=FinetuneConfig.steps,
        help=f"{PARAMETER_HELP['finetune_steps']} (default: {FinetuneConfig.steps})",
    )
    group.add_argument(
        "--benchmark", default="auto", choices=["auto", "quick", "full"], help=PARAMETER_HELP["benchmark"]
    )


def add_placement_flags(group) -> None:
    group.add_argument(
        "--local", action="store_true", help="run here with ClearML offline, even if a server is configured"
    )
    group.add_argument(
        "--output",
        type=cli.output_folder,
        default=None,
        help="run folder of the local mode (default: runs/<date-time>)",
    )
    group.add_argument("--overwrite", action="store_true", help="run again into an --output that holds an earlier run")
    group.add_argument("--queue", default="gpu", help="agent queue of the GPU steps in server mode (default: gpu)")
    group.add_argument(
        "--cpu-queue",
        default=None,
        help="agent queue of fetch_data and summary, which need no GPU (default: the same as --queue)",
    )
    group.add_argument(
        "--step-queue",
        action="append",
        default=[],
        metavar="STEP=QUEUE",
        help="another queue for one step, e.g. benchmark_attention=gpu-h100 (repeatable)",
    )
    group.add_argument("--controller-queue", default=None, help="run the controller on this queue instead of here")
    group.add_argument(
        "--docker-image",
        default=server.DEFAULT_IMAGE,
        help=f"image the agents run the steps in (default: {server.DEFAULT_IMAGE})",
    )
    group.add_argument("--output-uri", default=None, help=SERVER_PARAMETER_HELP["output_uri"] + " (default: empty)")
    group.add_argument(
        "--repo", default=None, help="git URL the agents clone, a local path as file:// (default: origin)"
    )
    group.add_argument("--commit", default=None, help="commit the agents run (default: this checkout's HEAD)")
    group.add_argument(
        "--dry-run",
        type=Path,
        default=None,
        metavar="DIR",
        help="build the server-mode pipeline with ClearML offline and write what each step will run into "
        "DIR/<step>/ (task.json and the generated script), without contacting a server",
    )


def check_inputs(params: dict, mode: str) -> None:
    """Refuses, in seconds and before the first step, a high-resolution size, a data source or an
    initial-weights source the steps could not use."""
    preset(params["preset"], **json.loads(params["settings"]))  # an unknown or wrong setting, named
    if mode == "local" and int(params["nodes"]) > 1:
        raise ConfigError(
            f"--nodes {params['nodes']}: the other machines are ClearML agents, so it needs server mode; "
            f"locally the train step already uses every GPU of this machine"
        )
    patch = architecture(PRESETS[params["preset"]])["patch_size"]
    check_image_size(int(params["highres_size"]), patch, "--highres-size")
    data = params["data"]
    if mode == "local" or Path(data).exists():  # in server mode anything else names a ClearML Dataset
        check_source(data, allow_kaggle=True)
    elif data != KAGGLE:
        tracking.check_dataset(data)
    if mode == "local" and data == KAGGLE:  # on agents the credentials are theirs
        check_kaggle_credentials("--data")
    init = params["init"] or PRESETS[params["preset"]].init
    if init.startswith("timm:") and mode == "local":  # on agents the download is theirs to make
        check_timm_source(init)
    if init and not init.startswith("timm:"):
        if mode == "server" and Path(init).exists():
            raise ConfigError(
                f"--init {init}: a file on this machine does not reach the agents; register it as a ClearML model "
                f"and pass its id, or pass timm:<model name>"
            )
        if mode == "local" and not Path(init).is_file():
            raise ConfigError(f"--init {init}: no such file; pass a .pt file, or timm:<model name>")


def read_settings(path: Path | None) -> str:
    """``--params FILE``: the training settings it holds, as the pipeline's parameter (JSON text)."""
    if path is None:
        return "{}"
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--params {path}: cannot read a JSON object from it ({first_line(error)})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f'--params {path}: holds no JSON object of settings, e.g. {{"lr": 0.002}}')
    return json.dumps(settings, sort_keys=True)


def launch_on_server(args: argparse.Namespace, params: dict) -> int:
    """Server mode from this machine: everything the agents will need is checked first (the
    server, the repository and commit, the data, the initial weights), a local data source is
    registered as a ClearML Dataset, then the pipeline starts."""
    if args.dry_run:
        repo, commit = server.agent_source(args.repo, args.commit, check=False)
    else:
        tracking.check_server()
        tracking.report_from_threads()
        repo, commit = server.agent_source(args.repo, args.commit)
        check_inputs(params, "server")
        server.check_destination(params["output_uri"])
    queues = server.step_queues(args.queue, args.cpu_queue or args.queue, args.step_queue)
    if Path(params["data"]).exists():  # the agents cannot read this machine's disk: they get a Dataset id
        if args.dry_run:
            params["data"] = "<the ClearML Dataset of the local data>"
        else:
            params["data"] = tracking.register_dataset(resolve(params["data"]), output_uri=args.output_uri)
            print(f"data {args.data} is the ClearML Dataset {params['data']}")
    if args.dry_run:
        params = {**params, **{f"queue_{step}": queue for step, queue in queues.items()}}
        server.dry_run(server.build_controller(params, args.docker_image, repo, commit), args.dry_run)
        return 0
    return server.run(params, queues, args.docker_image, repo, commit, args.controller_queue)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CLEARML_OFFLINE_MODE"] = "1"
        mode = "server"
    else:
        mode = "local" if args.local or not tracking.server_configured() else "server"
    output = (args.output or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    if mode == "local":
        os.environ["CLEARML_OFFLINE_MODE"] = "1"
    params = {
        "data": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
        "preset": args.preset,
        "epochs": args.epochs,
        "seed": args.seed,
        "init": str(Path(args.init).resolve()) if args.init and Path(args.init).exists() else args.init,
        "nodes": args.nodes,
        "highres_size": args.highres_size or default_highres_size(args.preset),
        "finetune_steps": args.finetune_steps,
        "benchmark": args.benchmark,
    }
    try:
        params["settings"] = read_settings(args.params)
        if mode == "server":
            from clearml import Task

            params["output_uri"] = args.output_uri or ""
            if not Task.running_locally():  # an agent runs this controller: its parameters are on its task
                return server.run_on_agent(params, args.docker_image)
            return launch_on_server(args, params)
        check_inputs(params, mode)
        return run_local(params, output, args.overwrite)
    except INPUT_ERRORS as error:
        print(f"run_pipeline: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the first step (the runners report their own interruptions)
        print("\ninterrupted: nothing was run or launched", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
