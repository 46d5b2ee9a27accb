"""The search on a ClearML server: ClearML's ``HyperParameterOptimizer`` with ``OptimizerOptuna``.

The optimizer clones a base training task once per trial, sets the trial's settings as the
clone's ``General/<setting>`` parameters (where ``components.train`` connects its settings, so
the agent's run trains with them) and enqueues it; Optuna's median pruner reads the trials'
per-epoch validation accuracy (scalar ``accuracy``/``valid``) as the server receives it and
stops a trial that trails the others. The base task is ``--base-task`` (for example the train
step of an earlier pipeline run), or one made here from the pipeline's training step, the
preset's settings filled in, as the pipeline's own train step is made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from components.common import tracking
from components.common.atomic import write_json
from components.common.data import KAGGLE, resolve
from components.common.errors import ConfigError
from components.common.presets import preset
from pipelines import server
from pipelines.checkout import REPO
from pipelines.dag import DAG
from pipelines.search_space import SECTION, Dimension, to_clearml, value_of

OBJECTIVE_TITLE, OBJECTIVE_SERIES = "accuracy", "valid"  # what `components.common.loop.record_validation` reports


def search_on_server(args: argparse.Namespace, space: list[Dimension], fixed: dict) -> dict | None:
    """Checks the server, makes or checks the base task, runs the optimizer until its trials
    are done (or its time is up), then shows the best trial on the optimizer's task and writes
    its settings to ``OUTPUT/best.json``. Returns ``{"task", "params", "value", "model"}`` of the
    best trial, None when none completed."""
    from clearml import Task

    tracking.check_server()
    tracking.report_from_threads()
    if args.base_task:
        base_id = checked_base_task(args.base_task, space)
    else:
        base_id = create_base_task(args, fixed)
    tracking.prepare_queues([args.queue])
    task = Task.init(
        project_name=tracking.PROJECT,
        task_name=f"optimize {args.preset}",
        task_type=Task.TaskTypes.optimizer,
        reuse_last_task_id=False,
        auto_connect_arg_parser=False,
        auto_connect_frameworks=False,
    )
    print(f"optimizer page: {task.get_output_log_web_page()}")
    optimizer = build_optimizer(base_id, space, args, fixed)
    try:
        optimizer.start()
        finished = optimizer.wait()  # False: the time limit passed first
    except KeyboardInterrupt:
        optimizer.stop()  # aborts the trials still queued or running
        print("\ninterrupted: the optimizer and its queued and running trials are stopped", file=sys.stderr)
        leave_now(task, 130)
    optimizer.stop()
    best = show_best(optimizer, task)
    if best is not None:
        output = (args.output or Path("runs") / f"optimize-{task.id}").resolve()
        write_json(best["params"], output / "best.json")
        print(f"best: task {best['task']}, valid accuracy {best['value']:.4f}, {json.dumps(best['params'])}")
        print(f"train the pipeline with them: python pipelines/run_pipeline.py --params {output / 'best.json'} ...")
    if not finished:
        print(f"the time limit of {args.time_limit:g} minutes passed; the trials still running were stopped")
        leave_now(task, 0 if best else 1)
    return best


def leave_now(task, code: int) -> None:
    """Ends the process once the optimizer's task is closed, without waiting for Optuna's worker
    threads: in clearml 2.1.12 `OptunaObjective` keeps polling a trial it aborted, and Optuna
    launches the next trial when one ends, so those threads outlive a stopped optimizer."""
    task.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_optimizer(base_id: str, space: list[Dimension], args: argparse.Namespace, fixed: dict):
    """The optimizer, built and not started: Optuna's TPE sampler (seeded) and median pruner,
    which may stop a trial after ``--prune-after`` epochs (default a quarter of its epochs)."""
    import optuna
    from clearml.automation import HyperParameterOptimizer
    from clearml.automation.optuna import OptimizerOptuna

    epochs = preset(args.preset, **fixed).epochs
    prune_after = args.prune_after or max(1, epochs // 4)
    optimizer = HyperParameterOptimizer(
        base_task_id=base_id,
        hyper_parameters=[to_clearml(dimension) for dimension in space],
        objective_metric_title=OBJECTIVE_TITLE,
        objective_metric_series=OBJECTIVE_SERIES,
        objective_metric_sign="max_global",  # the best validation of a run: the checkpoint it keeps
        optimizer_class=OptimizerOptuna,
        max_number_of_concurrent_tasks=args.concurrent,
        execution_queue=args.queue,
        optimization_time_limit=args.time_limit or None,
        total_max_jobs=args.trials,
        min_iteration_per_job=prune_after,
        max_iteration_per_job=None,
        pool_period_min=args.poll_seconds / 60,
        optuna_sampler=optuna.samplers.TPESampler(seed=args.seed),
        optuna_pruner=optuna.pruners.MedianPruner(n_startup_trials=args.concurrent, n_warmup_steps=prune_after),
    )
    optimizer.set_report_period(args.poll_seconds / 60)
    return optimizer


def checked_base_task(task_id: str, space: list[Dimension]) -> str:
    """``task_id``, once the server knows it and it holds the training settings the space names."""
    from clearml import Task

    try:
        base = Task.get_task(task_id=task_id)
    except ValueError:
        base = None
    if base is None:
        raise ConfigError(f"--base-task {task_id}: the server knows no such task; pass a training task's id")
    parameters = base.get_parameters(backwards_compatibility=False)
    missing = [d.name for d in space if f"{SECTION}/{d.name}" not in parameters]
    if missing:
        raise ConfigError(
            f"--base-task {task_id} has no {SECTION}/ parameters {', '.join(missing)}: it is not a training task of "
            f"this project; pass the train step of a pipeline run, or no --base-task to make one"
        )
    return task_id


def create_base_task(args: argparse.Namespace, fixed: dict) -> str:
    """A draft training task the optimizer clones: the pipeline's train step as a task of its own
    (the same generated script, repository, commit, image and requirements), its data a ClearML
    Dataset, its settings (the preset's, with ``fixed``) filled in as ``General/<setting>``."""
    from clearml import Task
    from clearml.backend_interface.task.populate import CreateFromFunction

    repo, commit = server.agent_source(args.repo, args.commit)
    data = dataset_id(args.data, args.output_uri)
    step = DAG["train"]
    kwargs = {
        "data": data,
        "preset": args.preset,
        "epochs": fixed.get("epochs", 0),
        "seed": fixed["seed"],
        "init": "",
        "settings": "{}",
        "nodes": 1,  # each trial on one machine, with all of its GPUs
    }
    definition = CreateFromFunction.create_task_from_function(
        a_function=step.function,
        function_kwargs=kwargs,
        function_return=list(step.returns),
        project_name=tracking.PROJECT,
        task_name=f"train {args.preset} (search base)",
        task_type=step.task_type,
        auto_connect_frameworks=False,
        auto_connect_arg_parser=False,
        repo=repo,
        commit=commit,
        packages=str(REPO / "requirements.txt"),
        docker=args.docker_image,
        dry_run=True,
        working_dir=".",
    )
    task = Task.create(project_name=tracking.PROJECT, task_name=definition["name"], task_type=definition["type"])
    task.update_task(definition)
    task.output_uri = args.output_uri or tracking.files_server()
    # What `components.train` connects, so that the draft shows what a trial will train with.
    settings = {"data": data, "preset": args.preset, **asdict(preset(args.preset, **fixed))}
    task.set_parameters({f"{SECTION}/{name}": value for name, value in settings.items()})
    print(f"base training task {task.id}: preset {args.preset} on data {data}, {repo} at {commit[:10]}")
    return task.id


def dataset_id(data: str, output_uri: str | None) -> str:
    """The ClearML Dataset the trials train on: ``data`` itself, or a local zip or folder
    registered as one (once per content)."""
    if Path(data).exists():
        registered = tracking.register_dataset(resolve(data), output_uri=output_uri)
        print(f"data {data} is the ClearML Dataset {registered}")
        return registered
    if data == KAGGLE:
        raise ConfigError(
            "--data kaggle: the trials train on a ClearML Dataset; pass the one a pipeline run registered, or a zip"
        )
    tracking.check_dataset(data)
    return data


def show_best(optimizer, task) -> dict | None:
    """The best completed trial, shown on the optimizer's task: its settings as a table and as
    the artifact ``best settings``, its model as the task's input model ``best trial``."""
    from clearml import InputModel, Task

    top = optimizer.get_top_experiments_details(top_k=1, only_completed=True)
    if not top:
        print("no trial completed: see the trials on the optimizer's page", file=sys.stderr)
        return None
    trial = Task.get_task(task_id=top[0]["task_id"])
    prefix = f"{SECTION}/"
    params = {
        name[len(prefix) :]: value_of(name[len(prefix) :], text) for name, text in top[0]["hyper_parameters"].items()
    }
    value = next(iter(top[0]["metrics"].values()))["max_value"]
    models = trial.models["output"]
    best = {"task": trial.id, "params": params, "value": value, "model": models[-1].id if models else None}
    import pandas as pd

    logger = task.get_logger()
    logger.report_table("best trial", "settings", iteration=0, table_plot=pd.DataFrame([params], index=[trial.id]))
    task.upload_artifact("best settings", artifact_object=params, wait_on_upload=True)
    if best["model"]:
        InputModel(model_id=best["model"]).connect(task, name="best trial", ignore_remote_overrides=True)
    return best
