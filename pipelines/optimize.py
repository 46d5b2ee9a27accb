"""A search over the training settings: Optuna chooses them, the validation accuracy judges them.

Server mode (ClearML configured): ClearML's ``HyperParameterOptimizer`` with ``OptimizerOptuna``
clones a base training task (``--base-task``, or one made from the training step and the
preset) once per trial, with the trial's settings as its ``General/<setting>`` parameters, and
enqueues the clones on ``--queue`` for the agents, ``--concurrent`` at a time; Optuna's median
pruner stops a trial whose validation accuracy (the scalar accuracy/valid, per epoch) trails the
others'. The optimizer's task shows the trials, the objective by trial and the best trial's
settings and model. Local mode (no server, or ``--local``): the same space and objective, an
Optuna study in this process, each trial a training run in ``OUTPUT/trial-<n>/``, the study in
``OUTPUT/study.db`` (a larger ``--trials`` into the same ``--output`` resumes it).

The objective is the best validation accuracy of a trial's run (that of the checkpoint it keeps);
the test split is never used to choose. ``OUTPUT/best.json`` holds the best settings, which
``run_pipeline.py --params OUTPUT/best.json`` trains with.

    python pipelines/optimize.py --data archive.zip --preset cpu-10min --epochs 15 --trials 12 --local
    python pipelines/optimize.py --data <Dataset id> --preset vit-ti16-224 --queue gpu --concurrent 4 --trials 40
    python pipelines/optimize.py --data archive.zip --preset smoke --space lr=1e-3:1e-2 --only lr,batch_size --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from components.common import cli, tracking
from components.common.data import check_source
from components.common.errors import INPUT_ERRORS
from components.common.presets import PRESETS
from pipelines import server
from pipelines.search_space import SECTION, narrowed, to_clearml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser("optimize", __doc__)
    search = parser.add_argument_group("what is searched")
    search.add_argument("--data", required=True, help="a zip or folder in the headgear layout, or a ClearML Dataset id")
    search.add_argument(
        "--preset", default="vit-ti16-224", choices=list(PRESETS), help="training preset (default: vit-ti16-224)"
    )
    search.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="NAME=RANGE",
        help="replace or add one dimension of the preset's space: NAME=LOW:HIGH (the default's scale), "
        "NAME=LOW:HIGH:log, NAME=LOW:HIGH:linear or NAME=A,B,C (repeatable)",
    )
    search.add_argument("--only", default="", metavar="NAME,NAME", help="search these settings alone (default: all)")
    search.add_argument("--epochs", type=cli.nonnegative_int, default=0, help="epochs of each trial; 0: the preset's")
    search.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of the trials and the sampler (0)")
    search.add_argument("--trials", type=cli.positive_int, default=20, help="trials in the study, all told (20)")
    search.add_argument(
        "--time-limit", type=cli.nonnegative_float, default=0, metavar="MINUTES", help="stop after; 0: none (0)"
    )
    search.add_argument(
        "--dry-run", action="store_true", help="print the space and ClearML's parameter ranges, run nothing"
    )
    local = parser.add_argument_group("local mode")
    local.add_argument("--local", action="store_true", help="search here, ClearML offline, even if a server is set")
    local.add_argument("--output", type=cli.output_folder, default=None, help="study folder (runs/optimize-<time>)")
    cli.add_device_flag(local)
    placement = parser.add_argument_group("server mode")
    placement.add_argument("--base-task", default=None, metavar="ID", help="training task to clone (default: made)")
    placement.add_argument("--queue", default="gpu", help="agent queue of the trials (gpu)")
    placement.add_argument("--concurrent", type=cli.positive_int, default=2, help="trials at a time (2)")
    placement.add_argument(
        "--prune-after", type=cli.nonnegative_int, default=0, metavar="EPOCHS",
        help="epochs a trial trains before the pruner may stop it; 0: a quarter of its epochs",
    )  # fmt: skip
    placement.add_argument(
        "--poll-seconds", type=cli.positive_float, default=60, help="how often the trials' scalars are read (60)"
    )
    placement.add_argument("--docker-image", default=server.DEFAULT_IMAGE, help="image of the trials")
    placement.add_argument("--output-uri", default=None, help="where the trials upload their models")
    placement.add_argument("--repo", default=None, help="git URL the agents clone (default: origin)")
    placement.add_argument("--commit", default=None, help="commit the agents run (default: HEAD)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "local" if args.local or args.dry_run or not tracking.server_configured() else "server"
    if mode == "local":
        os.environ["CLEARML_OFFLINE_MODE"] = "1"
    fixed = {"seed": args.seed, **({"epochs": args.epochs} if args.epochs else {})}
    try:
        only = [name.strip().replace("-", "_") for name in args.only.split(",") if name.strip()]
        space = narrowed(args.preset, args.space, only, **fixed)
        if args.dry_run:
            return dry_run(args.preset, space, fixed)
        if mode == "server":
            from pipelines.search_server import search_on_server

            best = search_on_server(args, space, fixed)
        else:
            best = search_here(args, space, fixed)
    except INPUT_ERRORS as error:
        print(f"optimize: error: {cli.one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the trials that ended are kept; run the same command to go on", file=sys.stderr)
        return 130
    if best is None:
        print("optimize: error: no trial completed; their errors are listed above", file=sys.stderr)
        return 1
    return 0


def search_here(args: argparse.Namespace, space: list, fixed: dict) -> dict | None:
    from pipelines.search_local import search

    check_source(args.data)
    output = (args.output or Path("runs") / datetime.now().strftime("optimize-%Y%m%d-%H%M%S")).resolve()
    limit = args.time_limit or None
    summary = search(args.data, args.preset, output, space, args.trials, fixed, limit, args.seed, args.device)
    best = summary["best"]
    completed = sum(trial["state"] == "complete" for trial in summary["trials"])
    print(f"{completed} of {len(summary['trials'])} trials completed; {output / 'optimize.json'}, optimize.png")
    if best is not None:
        print(f"best: trial {best['number']}, valid accuracy {best['value']:.4f}, {json.dumps(best['params'])}")
        print(f"train the pipeline with them: python pipelines/run_pipeline.py --params {output / 'best.json'} ...")
    return best


def dry_run(preset_name: str, space: list, fixed: dict) -> int:
    print(f"preset {preset_name}; every trial also gets {json.dumps(fixed)}")
    for dimension in space:
        print(f"  {dimension.describe():50s} ClearML: {to_clearml(dimension).to_dict()}")
    print(f"the trials' overrides are the training task's {SECTION}/<setting> parameters; nothing was run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
