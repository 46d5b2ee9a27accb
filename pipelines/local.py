"""Local mode: the DAG run on this machine in order, each step in its own process and its own
offline ClearML task, everything in one run folder."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from components.common.run_folder import claimed
from components.common.tracking import child_environment
from pipelines.dag import DAG, Step
from pipelines.terminal_log import TerminalLog

REPO = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 1.0  # what a Ctrl-C'd step gets to finish on its own; its writes are atomic either way
REFERENCE = re.compile(r"^\$\{(\w+)\.(\w+)\}$")
# What only the local runner passes: on an agent each step writes into its own clone, and the
# summary step's mode defaults to "server" (neither is a parameter to edit in the web UI).
LOCAL_KWARGS = {"summary": {"mode": "local"}}


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
        except KeyboardInterrupt:  # the step got the Ctrl-C too: a second to close its task, then it is ended
            try:
                child.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            finally:  # also when a second Ctrl-C cuts the grace short
                if child.poll() is None:
                    child.kill()
                    child.wait()
            raise
    if child.returncode != 0 or not result_path.is_file():
        return None, tail.decode("utf-8", "replace")
    return dict(zip(step.returns, json.loads(result_path.read_text()))), ""


def run_local(params: dict, run_dir: Path, overwrite: bool = False) -> int:
    """The DAG in order, each step in its own process, in ``run_dir`` (held for the run; one
    that holds an earlier run is refused unless ``overwrite``); a failed step skips its
    dependents."""
    advice = "pass another --output, or --overwrite to run again into it"
    outputs = ("steps", *DAG, "summary.json", "report.html")  # what a run writes (each step into its own folder)
    with claimed(run_dir, run_dir / "steps", overwrite, advice, outputs):
        return _run_steps(params, run_dir)


def _run_steps(params: dict, run_dir: Path) -> int:
    print(f"local run into {run_dir} (ClearML offline; no server configured or --local)")
    outputs: dict[str, dict] = {}
    step_seconds: dict[str, float] = {}  # of the completed steps, for the report
    status: dict[str, str] = {}
    failures: dict[str, str] = {}
    try:
        for name, step in DAG.items():
            if any(status.get(parent) != "completed" for parent in step.parents):
                status[name] = "skipped"
                continue
            print(f"\n=== {name} ===", flush=True)
            started = time.monotonic()
            status[name] = "running"
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
    except KeyboardInterrupt:
        stopped = [name for name, state in status.items() if state == "running"]
        finished = ", ".join(name for name, state in status.items() if state == "completed") or "none"
        kept = f"the steps that finished ({finished}) are kept in {run_dir}"
        print(f"\ninterrupted: {', '.join(stopped) or 'the run'} is stopped; {kept}", file=sys.stderr)
        return 130
    print("\nsteps:")
    for name in DAG:
        print(f"  {name:<20} {status[name]}")
    for name, error in failures.items():
        last_lines = "\n".join(error.strip().splitlines()[-15:])
        print(f"\nstep {name} failed (full log: {run_dir / 'steps' / f'{name}.log'}):\n{last_lines}", file=sys.stderr)
    return 1 if failures else 0
