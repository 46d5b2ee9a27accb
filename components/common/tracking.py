"""How every component talks to ClearML: one place.

Two modes, chosen once per process:

- **server**: ClearML is configured (``CLEARML_API_HOST`` or a ``clearml.conf``). The
  server is pinged with a short timeout first, because ``Task.init`` against an address
  where nothing answers retries for minutes.
- **offline**: nothing is configured, or ``CLEARML_OFFLINE_MODE=1`` (what ``--local`` sets).
  The task is written as an offline session; on close its zip is moved next to the
  component's outputs, ready for ``clearml-task --import-offline-session ZIP``.

A component run as a pipeline step on an agent finds its task already running (the step's
generated script made it): it reports into that task and leaves it open, because the
script still has to upload the step's return values into it.

Secrets never pass through here: parameters are the component's own settings, and
credentials are read from the environment by the libraries that need them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import signal
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.common.errors import TrackingError

PROJECT = "headgear-vit"
DATASET_PROJECT = f"{PROJECT}/datasets"
PING_TIMEOUT_S = 5.0
OFFLINE_CONFIG = Path(__file__).with_name("clearml-offline.conf")


def offline_forced() -> bool:
    return os.environ.get("CLEARML_OFFLINE_MODE", "").lower() in ("1", "true", "yes", "on")


def config_file() -> Path:
    return Path(os.environ.get("CLEARML_CONFIG_FILE") or Path.home() / "clearml.conf").expanduser()


def server_configured() -> bool:
    """True when ClearML has somewhere to report to (``CLEARML_API_HOST``, or a config file
    naming an api_server, as ``clearml-init`` writes) and offline mode is not forced."""
    if offline_forced():
        return False
    path = config_file()
    return bool(os.environ.get("CLEARML_API_HOST")) or (path.is_file() and "api_server" in path.read_text())


def api_host() -> str:
    from clearml.backend_api.session import Session

    return Session.get_api_server_host()


def check_server(timeout_s: float = PING_TIMEOUT_S) -> str:
    """The API server's address, once it has answered a ping within ``timeout_s``."""
    import requests

    host = api_host()
    try:
        requests.get(f"{host}/debug.ping", timeout=timeout_s).raise_for_status()
    except requests.RequestException as error:
        if isinstance(error, requests.Timeout):
            what = f"did not answer within {timeout_s:g} s"
        elif isinstance(error, requests.ConnectionError):
            what = "refused the connection (nothing listens there)"
        else:
            what = f"answered with an error ({error})"
        raise TrackingError(
            f"the ClearML server at {host} {what}. "
            f"Start it or fix CLEARML_API_HOST / {config_file()}, or run without a server: "
            f"pass --local to the pipeline or set CLEARML_OFFLINE_MODE=1"
        ) from None
    return host


def report_from_threads() -> None:
    """Makes ClearML report from threads of this process instead of a forked sub-process (the
    Linux default, ``sdk.development.report_use_subprocess``). A fork taken while repository
    detection reads ``git``'s output inherits that pipe: detection never ends, and whatever
    waits for it (``PipelineController``, 300 s) gives up and stores the task without its
    repository. Call it before the first task of the process."""
    from clearml.config import ConfigSDKWrapper, ConfigWrapper

    ConfigWrapper.set_overrides({"sdk": {"development": {"report_use_subprocess": False}}})
    ConfigSDKWrapper.clear_config_impl()


def files_server() -> str:
    """The file server the SDK uploads to when a task's output destination is True."""
    from clearml.backend_api.session import Session

    return Session.get_files_server_host()


def prepare_queues(names: list[str]) -> dict[str, bool]:
    """Creates the queues the server lacks (a controller skips a step whose queue does not
    exist); returns, for each queue, whether an agent serves it."""
    from clearml.backend_api.session.client import APIClient

    client = APIClient()
    existing = {queue.name for queue in client.queues.get_all()}
    for name in names:
        if name not in existing:
            client.queues.create(name=name)
            print(f"created the queue {name!r} on the server")
    served = {queue.name for worker in client.workers.get_all() for queue in worker.queues or []}
    return {name: name in served for name in names}


def child_environment(**overrides: str) -> dict[str, str]:
    """The environment for a component started as a new process: without the markers
    ClearML sets for its own sub-processes, which would make the child's task a stub of ours."""
    markers = ("CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID", "CLEARML_TASK_ID", "TRAINS_TASK_ID")
    env = {k: v for k, v in os.environ.items() if k not in markers}
    return {**env, **overrides}


class Tracker:
    """A thin face over one ClearML task, the same online and offline."""

    def __init__(self, task, component: str, offline: bool, output_dir: Path, reused: bool = False):
        self.task, self.component, self.offline, self.output_dir = task, component, offline, output_dir
        self.reused = reused  # the task was already running (a pipeline step): it stays open after the block
        self.logger = task.get_logger()
        self.session: str = task.id  # becomes the offline session's zip path on close

    def connect(self, params: dict, name: str = "General") -> dict:
        """Records ``params`` as hyper-parameters; a task cloned in the web UI and run by an
        agent gets the edited values back."""
        return self.task.connect(params, name=name)

    def scalar(self, title: str, series: str, value: float, step: int) -> None:
        self.logger.report_scalar(title, series, value=float(value), iteration=step)

    def table(self, title: str, frame, step: int = 0) -> None:
        shown = frame.astype(object).where(frame.notna(), "")  # ClearML cannot show NaN
        self.logger.report_table(title, "table", iteration=step, table_plot=shown)

    def figure(self, title: str, figure, step: int = 0) -> None:
        """Reports a matplotlib figure as an image, then closes it (save it to a file first)."""
        import matplotlib.pyplot as plt

        self.logger.report_matplotlib_figure(title, "figure", figure=figure, iteration=step, report_image=True)
        plt.close(figure)

    def artifact(self, name: str, obj) -> None:
        self.task.upload_artifact(name, artifact_object=obj, wait_on_upload=True)

    def model(self, path: Path, name: str, config: dict) -> str | None:
        """Registers weights: an ``OutputModel`` named ``name`` in the registry, shown on the
        task under the component's name (what the pipeline's page monitors), with a server
        (returns its id, which later steps resolve to a local copy), its labels those the
        checkpoint was trained on, its weights uploaded to the task's output destination;
        offline, where ``OutputModel`` crashes, an artifact."""
        if self.offline:
            self.artifact(name, path)
            return None
        import torch
        from clearml import OutputModel

        classes = torch.load(path, map_location="cpu", weights_only=True).get("classes") or []
        output = OutputModel(
            task=self.task,
            name=name,
            config_dict=config,
            framework="PyTorch",
            label_enumeration={label: index for index, label in enumerate(classes)},
        )
        output.connect(self.task, name=self.component)  # else the task names it after the file
        output.update_weights(weights_filename=str(path), auto_delete_file=False)
        return output.id


@contextmanager
def open_task(component: str, task_type: str, output_dir: Path, title: str = "") -> Iterator[Tracker]:
    """A ClearML task for one run of ``component``, named ``title`` (default: the component).
    If a task is already running in this process (a pipeline step on an agent, whose script
    made it), that one, left open; otherwise a new one, closed when the block ends, also with
    an error. Offline, a new task's session zip is kept as
    ``output_dir/<component>.clearml-offline.zip``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    offline = not server_configured()
    from clearml import Task

    running = Task.current_task()
    if running is not None:
        yield Tracker(running, component, offline, output_dir, reused=True)
        return
    if offline and "CLEARML_CONFIG_FILE" not in os.environ:
        # The reporter's sub-process waits 10 s per close for a server offline; threads do not.
        os.environ["CLEARML_CONFIG_FILE"] = str(OFFLINE_CONFIG)
    if not offline:
        check_server()
    if importlib.util.find_spec("IPython"):
        # ClearML's repository detection imports IPython in a thread; matplotlib, drawing in this
        # thread meanwhile, trips over the half-imported module. Import it whole first.
        import IPython  # noqa: F401

    Task.set_offline(offline)
    task = Task.init(
        project_name=PROJECT,
        task_name=title or component,
        task_type=task_type,
        reuse_last_task_id=False,
        auto_connect_arg_parser=False,  # parameters are connected explicitly, as one dict
        auto_connect_frameworks=False,  # models are registered explicitly, never by torch.save hooks
        auto_resource_monitoring=not offline,
        output_uri=None if offline else True,
    )
    tracker = Tracker(task, component, offline, output_dir)
    previous = _exit_on_sigterm()
    try:
        yield tracker
    finally:
        task.flush(wait_for_uploads=True)  # close alone may zip an offline session before its last reports
        task.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if offline:
            tracker.session = str(_keep_offline_session(task.id, output_dir, component))


def report_results(title: str, values: dict[str, float | None]) -> None:
    """Reports each number of ``values`` (None: not measured) as a scalar of the running task,
    if one is (a pipeline step): what the pipeline page monitors."""
    from clearml import Task

    task = Task.current_task()
    if task is None:
        return
    for series, value in values.items():
        if value is not None:
            task.get_logger().report_scalar(title, series, value=float(value), iteration=0)


def _plot_artifact(entry: dict) -> str:
    """The artifact name of a result's plot entry (``{"path", "caption"}``)."""
    return f"plot {Path(entry['path']).name}"


def upload_plots(result: dict) -> dict:
    """In a pipeline step with a server: uploads each of ``result["plots"]`` as an artifact of
    the running task, for the summary step, which runs in another container, to fetch with
    ``download_plots``. Returns ``result``."""
    from clearml import Task

    task = Task.current_task()
    if task is not None and server_configured():
        for entry in result.get("plots", []):
            task.upload_artifact(_plot_artifact(entry), artifact_object=Path(entry["path"]), wait_on_upload=True)
    return result


def download_plots(result: dict, folder: Path) -> dict:
    """``result`` with its plots replaced by local copies (in ``folder``) of the artifacts that
    ``upload_plots`` stored on the step's task, ``result["clearml"]``."""
    from clearml import Task

    plots = result.get("plots", [])
    if not plots:
        return result
    artifacts = Task.get_task(task_id=result["clearml"]).artifacts
    local = []
    for entry in plots:
        name = _plot_artifact(entry)
        if name not in artifacts:
            raise TrackingError(f"task {result['clearml']} has no artifact {name!r}: its step did not upload its plots")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / Path(entry["path"]).name
        shutil.copyfile(artifacts[name].get_local_copy(raise_on_error=True), path)
        local.append({**entry, "path": str(path)})
    return {**result, "plots": local}


# --- what lives on the server: Datasets and registered models ---------------------------------


def register_dataset(data, parent: str | None = None, output_uri: str | None = None) -> str:
    """The id of the ClearML Dataset holding ``data`` (a `components.common.data.DataVersion`), created
    only if no completed, unarchived dataset with the same content hash exists. ``parent``: the
    id of the ClearML Dataset the version was prepared from, recorded as its parent (the lineage
    in the web UI); the new version holds exactly the prepared files, whatever the parent had.
    Its files go to ``output_uri`` (default: the running task's output destination, else the
    file server)."""
    from clearml import Dataset, Task

    tags = [f"sha:{data.version}"]
    if output_uri is None and Task.current_task() is not None:
        output_uri = Task.current_task().output_uri or None
    try:
        existing = Dataset.list_datasets(dataset_project=DATASET_PROJECT, tags=tags, include_archived=False)
        usable = [d for d in existing if str(d["status"]) in ("completed", "published")]  # not an upload cut short
        if usable:
            return usable[0]["id"]
        dataset = Dataset.create(
            dataset_name="headgear",
            dataset_project=DATASET_PROJECT,
            dataset_tags=tags,
            parent_datasets=[parent] if parent else None,
            output_uri=output_uri,
        )
        dataset.sync_folder(local_path=str(data.root))
        dataset.upload(show_progress=True)
        dataset.finalize()
    except Exception as error:  # the server or its file storage failed; ClearML raises many kinds
        raise TrackingError(
            f"could not register data version {data.version} as a ClearML Dataset ({type(error).__name__}: "
            f"{error}); check the server and its file storage (--output-uri), then run again"
        ) from None
    return dataset.id


def check_dataset(dataset_id: str) -> None:
    """Raises a TrackingError unless the server knows a finished Dataset of that id."""
    from clearml import Dataset

    found = Dataset.list_datasets(ids=[dataset_id], only_completed=False)
    if not found:
        raise TrackingError(
            f"data source {dataset_id!r} is neither a file or folder here nor a ClearML Dataset the server knows; "
            f"pass 'kaggle', a zip, a folder in the headgear layout or a Dataset id"
        )
    if str(found[0]["status"]) not in ("completed", "published"):
        raise TrackingError(
            f"the ClearML Dataset {dataset_id} is {found[0]['status']}, not finalized: its upload did not finish; "
            f"upload it again or pass another Dataset"
        )


def dataset_local_copy(dataset_id: str) -> Path:
    """A local copy of the files of the ClearML Dataset ``dataset_id``."""
    from clearml import Dataset

    try:
        return Path(Dataset.get(dataset_id=dataset_id).get_local_copy())
    except ValueError as error:
        raise TrackingError(
            f"data source {dataset_id!r} is neither a file or folder here nor a ClearML Dataset id the server "
            f"knows ({error}); pass a zip, a folder in the headgear layout or a Dataset id"
        ) from None


@functools.cache
def registered_model(model_id: str, role: str) -> Path:
    """The weights of a registered model, downloaded once per process and connected to the
    running task as its input model named ``role`` (the model's lineage in the web UI)."""
    from clearml import InputModel, Task

    def refuse(reason: str):
        raise TrackingError(
            f"no checkpoint at {model_id} and no ClearML model {model_id} could be downloaded ({reason}); pass a "
            f"checkpoint file or the id of a model that train registered with its weights uploaded (the "
            f"pipeline's --output-uri)"
        )

    try:
        model = InputModel(model_id=model_id)
        model.name  # noqa: B018 - an id the server does not know leaves the model without data
    except Exception:  # ClearML raises many kinds for an unknown id
        refuse("the server knows no model of that id")
    if Task.current_task() is not None:  # the id given, not one a cloned task held before
        model.connect(Task.current_task(), name=role, ignore_remote_overrides=True)
    try:
        local = model.get_local_copy(raise_on_error=True)
    except Exception as error:  # ClearML raises many kinds for a failed download
        refuse(f"{type(error).__name__}: {error}")
    if not local:
        refuse("it has no weights file")
    return Path(local)


def task_seconds(task_id: str) -> float | None:
    """The wall time of a finished task, from the server's record of its start and end."""
    from clearml import Task

    data = Task.get_task(task_id=task_id).data
    return (data.completed - data.started).total_seconds() if data.started and data.completed else None


def _exit_on_sigterm():
    """A SIGTERM (``kill``, ``timeout``, an agent aborting the task) unwinds like Ctrl-C, so the
    task is closed and the files being written are finished or removed. ClearML's own handler
    would close the task from inside the signal handler while training went on, and hang.
    Returns the handler it replaced (None outside the main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, terminate)


def _keep_offline_session(task_id: str, output_dir: Path, component: str) -> Path:
    from clearml.config import get_offline_dir

    folder = Path(get_offline_dir(task_id=task_id))
    zipped, target = folder.with_suffix(".zip"), output_dir / f"{component}.clearml-offline.zip"
    if not zipfile.is_zipfile(zipped):  # ClearML ignores a failed write of it (a full disk): keep no broken zip
        zipped.unlink(missing_ok=True)
        print(f"note: ClearML could not write the offline session's zip; what it recorded is in {folder}")
        return folder
    try:
        shutil.move(str(zipped), target)
    except OSError as error:  # raised here it would hide the error that ended the run
        target.unlink(missing_ok=True)
        print(f"note: could not move the offline session to {target} ({error.strerror}); it is at {zipped}")
        return zipped
    shutil.rmtree(folder, ignore_errors=True)
    print(f"ClearML Task: offline session moved to {target}")  # ClearML has just named the old place
    return target
