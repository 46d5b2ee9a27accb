"""How every component talks to ClearML: one place.

Two modes, chosen once per process:

- **server**: ClearML is configured (``CLEARML_API_HOST`` or a ``clearml.conf``). The
  server is pinged with a short timeout first, because ``Task.init`` against an address
  where nothing answers retries for minutes.
- **offline**: nothing is configured, or ``CLEARML_OFFLINE_MODE=1`` (what ``--local`` sets).
  The task is written as an offline session; on close its zip is moved next to the
  component's outputs, ready for ``clearml-task --import-offline-session ZIP``.

Secrets never pass through here: parameters are the component's own settings, and
credentials are read from the environment by the libraries that need them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT = "headgear-vit"
PING_TIMEOUT_S = 5.0
OFFLINE_CONFIG = Path(__file__).with_name("clearml-offline.conf")


class TrackingError(RuntimeError):
    """ClearML is configured but cannot be used; the message says what to do."""


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
        raise TrackingError(
            f"the ClearML server at {host} did not answer within {timeout_s:.0f} s ({type(error).__name__}). "
            f"Start it or fix CLEARML_API_HOST / {config_file()}, or run without a server: "
            f"pass --local to the pipeline or set CLEARML_OFFLINE_MODE=1"
        ) from None
    return host


def child_environment(**overrides: str) -> dict[str, str]:
    """The environment for a component started as a new process: without the markers
    ClearML sets for its own sub-processes, which would make the child's task a stub of ours."""
    markers = ("CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID", "CLEARML_TASK_ID", "TRAINS_TASK_ID")
    env = {k: v for k, v in os.environ.items() if k not in markers}
    return {**env, **overrides}


class Tracker:
    """A thin face over one ClearML task, the same online and offline."""

    def __init__(self, task, offline: bool, output_dir: Path):
        self.task, self.offline, self.output_dir = task, offline, output_dir
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
        """Registers weights: an ``OutputModel`` with a server (returns its id, which later
        steps resolve to a local copy); offline, where ``OutputModel`` crashes, an artifact."""
        if self.offline:
            self.artifact(name, path)
            return None
        from clearml import OutputModel

        output = OutputModel(task=self.task, name=name, config_dict=config, framework="PyTorch")
        output.update_weights(weights_filename=str(path), auto_delete_file=False)
        return output.id


@contextmanager
def open_task(component: str, task_type: str, output_dir: Path, title: str = "") -> Iterator[Tracker]:
    """A ClearML task for one run of ``component``, named ``title`` (default: the component);
    closed when the block ends, also with an error. Offline, the session's zip is kept as
    ``output_dir/<component>.clearml-offline.zip``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    offline = not server_configured()
    if offline and "CLEARML_CONFIG_FILE" not in os.environ:
        # The reporter's sub-process waits 10 s per close for a server offline; threads do not.
        os.environ["CLEARML_CONFIG_FILE"] = str(OFFLINE_CONFIG)
    if not offline:
        check_server()
    if importlib.util.find_spec("IPython"):
        # ClearML's repository detection imports IPython in a thread; matplotlib, drawing in this
        # thread meanwhile, trips over the half-imported module. Import it whole first.
        import IPython  # noqa: F401
    from clearml import Task

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
    tracker = Tracker(task, offline, output_dir)
    previous = _exit_on_sigterm()
    try:
        yield tracker
    finally:
        task.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if offline:
            tracker.session = str(_keep_offline_session(task.id, output_dir, component))


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
    target = output_dir / f"{component}.clearml-offline.zip"
    shutil.move(str(folder.with_suffix(".zip")), target)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"ClearML Task: offline session moved to {target}")  # ClearML has just named the old place
    return target
