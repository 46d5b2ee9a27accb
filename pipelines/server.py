"""Server mode: the DAG as a ClearML ``PipelineController`` whose steps agents run.

Every step is a task enqueued on its queue and run by ``clearml-agent daemon --queue Q
--docker IMAGE`` from a fresh clone of the repository at one commit; the steps hand each other
ClearML ids (Dataset, model, artifacts), never paths. The controller runs here, or on an agent
(``--controller-queue``), which re-runs ``pipelines/run_pipeline.py`` with its default flags:
everything a run needs is therefore a pipeline parameter (editable in the web UI), read back
from the controller task there.
"""

import json
import sys
from pathlib import Path
from urllib.parse import urlparse

from components.common import tracking
from components.common.errors import ConfigError, first_line
from pipelines.checkout import REPO, git, has_uncommitted_changes, head
from pipelines.dag import DAG, PARAMETER_HELP

DEFAULT_IMAGE = "headgear-vit:latest"
SERVER_PARAMETER_HELP = {
    "output_uri": "where the steps upload models, artifacts and Datasets (empty: the server's file server)",
    **{f"queue_{name}": f"agent queue the {name} step is enqueued on" for name in DAG},
}


# --- what the agents clone ------------------------------------------------------------------------


def as_clone_url(repo: str, relative_to: Path) -> str:
    """``repo`` as an agent can clone it: a URL as it is, a local path as a ``file://`` URL (a
    string without a scheme would be taken by ClearML as a folder to analyse)."""
    if "://" in repo or (":" in repo.split("/")[0] and not Path(repo).exists()):  # a URL, or scp-like git@host:path
        return repo
    return (relative_to / Path(repo).expanduser()).resolve().as_uri()


def agent_source(repo: str | None, commit: str | None, check: bool = True) -> tuple[str, str]:
    """The repository URL and commit the agents clone and run: ``repo`` and ``commit``, else
    this checkout's ``origin`` and ``HEAD``. With ``check``, refuses (in seconds) a repository
    that cannot be cloned and a commit that is not on it (not pushed)."""
    if repo is None:
        code, origin = git("remote", "get-url", "origin")
        if code:
            raise ConfigError(
                "server mode runs the steps from a git repository the agents can clone: push this checkout to a "
                "remote (origin) or pass --repo URL --commit SHA"
            )
        repo = as_clone_url(origin, REPO)
    else:
        repo = as_clone_url(repo, Path.cwd())
    if commit is None:
        commit = head()
        if commit is None:
            raise ConfigError(f"{REPO} is not a git checkout: pass --repo URL --commit SHA of what the agents run")
        if has_uncommitted_changes():
            print(f"note: uncommitted changes are not run by the agents; they run commit {commit[:10]}")
    if check:
        _check_pushed(repo, commit)
    return repo, commit


def _check_pushed(repo: str, commit: str) -> None:
    code, listing = git("ls-remote", repo)
    if code:
        raise ConfigError(
            f"--repo {repo} cannot be cloned ({first_line(listing or 'no answer')}); pass a repository URL the agents "
            f"can reach"
        )
    code, full = git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    heads = {line.split()[0] for line in listing.splitlines() if line.strip()}
    if (full if code == 0 else commit) in heads:
        return
    if code:
        print(f"note: commit {commit} is not in this checkout, so whether {repo} has it is not checked")
        return
    known = [head for head in heads if git("cat-file", "-e", f"{head}^{{commit}}")[0] == 0]
    if any(git("merge-base", "--is-ancestor", full, head)[0] == 0 for head in known):
        return
    if len(known) == len(heads):
        raise ConfigError(
            f"commit {full[:10]} is not on {repo}: the agents could not check it out; push it first (git push), or "
            f"pass --commit of a pushed commit"
        )
    print(f"note: could not tell whether {repo} has commit {full[:10]} (fetch it to know); the agents need it pushed")


# --- queues and destinations -----------------------------------------------------------------


def step_queues(queue: str, cpu_queue: str, overrides: dict[str, str]) -> dict[str, str]:
    """The queue of every step: ``overrides`` (``--step-queue``), else ``cpu_queue`` for the
    steps that need no GPU and ``queue`` for the others."""
    unknown = set(overrides) - set(DAG)
    if unknown:
        raise ConfigError(f"--step-queue names unknown steps {sorted(unknown)}; the steps are {', '.join(DAG)}")
    return {name: overrides.get(name, queue if step.gpu else cpu_queue) for name, step in DAG.items()}


def print_agent_commands(queues: dict[str, str], served: dict[str, bool], docker_image: str) -> None:
    """How to start an agent for each queue (with GPUs only where a step needs one)."""
    for queue in sorted(set(queues.values())):
        gpus = " --gpus all" if any(DAG[name].gpu for name, q in queues.items() if q == queue) else ""
        state = "an agent serves it" if served[queue] else "no agent serves it yet"
        print(f"steps go to the queue {queue!r} ({state}); an agent takes them with:")
        print(f"  clearml-agent daemon --queue {queue} --docker {docker_image}{gpus}")


def check_destination(output_uri: str) -> None:
    """Warns when the steps would upload to this machine's loopback address, which agents in
    containers or on other machines cannot reach."""
    destination = output_uri or tracking.files_server()
    host = urlparse(destination).hostname or ""
    if host == "localhost" or host.startswith("127.") or host == "::1":
        print(
            f"warning: the steps upload models, artifacts and Datasets to {destination}, a loopback address: agents "
            f"in Docker containers or on other machines cannot reach it. Pass --output-uri with an address they "
            f"can reach, or set api.files_server in clearml.conf"
        )


def _output_destination(pipeline, node, parameters: dict) -> bool:
    """Before each step is created: its uploads go to the pipeline's ``output_uri`` parameter,
    read then, so that a controller re-run by an agent or from the web UI keeps it."""
    node.output_uri = pipeline.get_parameters().get("output_uri") or True
    return True


# --- the controller ---------------------------------------------------------------------------


def build_controller(params: dict, docker_image: str, repo: str | None, commit: str | None):
    """The ``PipelineController`` of the DAG, built but not started. ``params`` become the
    pipeline's parameters (editable in the web UI, kept when an agent re-runs the controller),
    each step's queue among them (``queue_<step>``). The controller itself records ``repo`` at
    ``commit`` and its entry point, so that an agent can run it."""
    from clearml import PipelineController

    pipe = PipelineController(
        name="headgear-vit",
        project=tracking.PROJECT,
        version="1.0.0",
        add_pipeline_tags=True,
        docker=docker_image,
        packages=str(REPO / "requirements.txt"),
        repo=repo,
        repo_commit=commit,
        working_dir=".",
    )
    for name, value in params.items():
        pipe.add_parameter(name, value, {**PARAMETER_HELP, **SERVER_PARAMETER_HELP}[name])
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
            cache_executed_step=name == "fetch_data",  # the same source on the same commit: reused
            pre_execute_callback=_output_destination,
            monitor_metrics=list(step.monitor_metrics),
            monitor_models=[name] if step.registers_model else [],
        )
    return pipe


def dry_run(pipe, folder: Path) -> None:
    """Writes what each agent will run: ``folder/<step>/task.json`` (the task definition the
    controller stores for the step, with the queue, parents and parameters it launches it
    with), ``folder/<step>/<function>.py`` (the script ClearML generated for the step) and
    ``folder/pipeline.json`` (the pipeline's parameters, as the web UI shows them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.json").write_text(json.dumps({"parameters": pipe.get_parameters()}, indent=2))
    for name, node in pipe.get_pipeline_dag().items():
        definition = json.loads(pipe._task._get_configuration_text(name=name))
        definition["pipeline"] = {
            "queue": node.queue,
            "parents": node.parents,
            "parameters": node.parameters,
            "cache_executed_step": node.cache_executed_step,
            "monitor_metrics": node.monitor_metrics,
            "monitor_models": node.monitor_models,
        }
        step_folder = folder / name
        step_folder.mkdir(parents=True, exist_ok=True)
        (step_folder / "task.json").write_text(json.dumps(definition, indent=2, default=str))
        (step_folder / definition["script"]["entry_point"]).write_text(definition["script"]["diff"])
    print(f"dry run: what each step runs is in {folder}/<step>/ (task.json and the generated script)")


def outcome(pipe, page: str) -> int:
    """The exit status of a finished pipeline, with a last line that says how it ended: 0 when
    every step completed (or was reused from the cache), else 1, naming the steps that failed
    and pointing to the pipeline's ``page``."""
    status = {name: node.status for name, node in pipe.get_pipeline_dag().items()}
    failed = [name for name, state in status.items() if state in ("failed", "aborted")]
    not_run = [name for name, state in status.items() if state not in ("completed", "cached", "failed", "aborted")]
    if not failed and not not_run:
        print(f"pipeline completed: {page}")
        return 0
    steps = f"step {', '.join(failed)} failed" if failed else "no step failed"
    skipped = f"; not run: {', '.join(not_run)}" if not_run else ""
    print(f"run_pipeline: error: the pipeline failed: {steps}{skipped}. Logs: {page}", file=sys.stderr)
    return 1


def stop(pipe) -> list[str]:
    """Stops the controller and the steps it launched that are queued or running (an agent
    kills a running step once its task is stopped); returns their names."""
    stopped = []
    for name, node in pipe.get_pipeline_dag().items():
        if node.job and not node.job.is_stopped():
            node.job.abort()
            stopped.append(name)
    pipe.stop(mark_aborted=True)
    return stopped


def run(
    params: dict, queues: dict[str, str], docker_image: str, repo: str, commit: str, controller_queue: str | None
) -> int:
    """Launches the pipeline from this machine: the controller runs here until the pipeline
    ends (returns its exit status), or is enqueued on ``controller_queue`` (the process ends
    there, with status 0)."""
    served = tracking.prepare_queues(sorted({*queues.values(), *([controller_queue] if controller_queue else [])}))
    params = {**params, **{f"queue_{step}": queue for step, queue in queues.items()}}
    pipe = build_controller(params, docker_image, repo, commit)
    from clearml import Task

    page = Task.current_task().get_output_log_web_page()
    print(f"pipeline page: {page}")
    print_agent_commands(queues, served, docker_image)
    if controller_queue:
        print(f"the controller runs on the queue {controller_queue!r}; this command ends once it is enqueued")
        pipe.start(queue=controller_queue)  # ends this process
    try:
        pipe.start_locally(run_pipeline_steps_locally=False)
    except KeyboardInterrupt:
        stopped = stop(pipe)
        print(
            f"\ninterrupted: the pipeline is stopped, and so are its steps {', '.join(stopped) or '(none running)'}",
            file=sys.stderr,
        )
        return 130
    return outcome(pipe, page)


def run_on_agent(params: dict, docker_image: str) -> int:
    """The controller as an agent runs it (``--controller-queue``, or "Run" in the web UI): the
    pipeline's parameters, queues included, are read back from its task when it starts."""
    params = {**params, **{f"queue_{step}": "" for step in DAG}}
    pipe = build_controller(params, docker_image, repo=None, commit=None)
    from clearml import Task

    page = Task.current_task().get_output_log_web_page()
    pipe.start_locally(run_pipeline_steps_locally=False)
    return outcome(pipe, page)
