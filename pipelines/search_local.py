"""The search on this machine: an Optuna study in this process, each trial a training run in
``OUTPUT/trial-<n>/`` with its own offline ClearML session.

The study lives in ``OUTPUT/study.db`` (Optuna's SQLite storage), so a second call into the same
folder with a larger ``--trials`` resumes it and runs only the trials still missing. A trial
that fails (a bad combination, out of memory) is recorded as failed with its reason and the
study goes on; one interrupted (Ctrl-C, a killed process) is recorded too but does not count,
so a resumed study runs it again.
"""

from __future__ import annotations

import time
from pathlib import Path

from components.common.atomic import write_json
from components.common.data import resolve
from components.common.errors import ConfigError, first_line
from components.common.plots import plt
from components.common.run_folder import claimed
from components.common.tracking import open_task
from components.train import train
from pipelines.search_report import study_figure, summarize, trials_table
from pipelines.search_space import Dimension, suggest

STUDY_NAME = "headgear-vit"
STORAGE = "study.db"


def search(
    data: str,
    preset_name: str,
    output: Path,
    space: list[Dimension],
    trials: int,
    fixed: dict,
    time_limit_minutes: float | None = None,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Runs the study in ``output`` until it holds ``trials`` trials that ran to their end
    (completed or failed), or ``time_limit_minutes`` have passed; returns what
    ``output/optimize.json`` holds (`search_report.summarize`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets a line of ours instead
    search_settings = {"preset": preset_name, "space": [d.describe() for d in space], "fixed": fixed}
    with claimed(output):
        study = open_study(output, search_settings, seed)
        missing = trials - len(counted(study))
        if missing <= 0:
            print(f"the study in {output} holds {len(counted(study))} trials already; a larger --trials runs more")
        else:
            version = resolve(data)  # prepared once, not once per trial
            print(
                f"study {output / STORAGE}: {missing} of {trials} trials to run; {', '.join(search_settings['space'])}"
            )
            objective = trial_runner(str(version.root), preset_name, output, space, fixed, device, trials)
            timeout = time_limit_minutes * 60 if time_limit_minutes else None
            try:
                study.optimize(objective, n_trials=missing, timeout=timeout, catch=(Exception,))
            except KeyboardInterrupt:
                finish(study, output, search_settings, space, tracked=False)
                raise
        return finish(study, output, search_settings, space, tracked=True)


def finish(study, output: Path, search_settings: dict, space: list[Dimension], tracked: bool) -> dict:
    """Writes optimize.json, best.json and optimize.png; with ``tracked``, also reports them to
    the study's own offline ClearML task."""
    summary = summarize(study, search_settings)
    figure = study_figure(summary, space)
    figure.savefig(output / "optimize.png", dpi=110)
    if tracked:
        summary["clearml"] = tracked_report(output, figure, summary)
    else:
        plt.close(figure)
    if summary["best"] is not None:
        write_json(summary["best"]["params"], output / "best.json")
    write_json(summary, output / "optimize.json")
    return summary


def open_study(output: Path, search_settings: dict, seed: int):
    """The study stored in ``output`` (created on the first call), refused when it searched
    another space; trials a killed process left running are recorded as interrupted."""
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{(output / STORAGE).resolve()}"
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True)
    # Seeded by the trials already there, so that a resumed study does not draw the same settings again.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    earlier = study.user_attrs.get("search")
    if earlier is None:
        study.set_user_attr("search", search_settings)
    elif earlier != search_settings:
        raise ConfigError(
            f"{output} holds a study of another search ({_differences(earlier, search_settings)}); pass the same "
            f"--preset, --space, --only and fixed settings to resume it, or another --output"
        )
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Optuna's public API sets attributes only on the trials this process asked for.
        study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted")
        study.tell(trial.number, state=TrialState.FAIL)
    return study


def _differences(earlier: dict, now: dict) -> str:
    return "; ".join(f"{key}: {earlier.get(key)} then, {now[key]} now" for key in now if earlier.get(key) != now[key])


def counted(study) -> list:
    """The trials that count towards ``--trials``: finished, and not interrupted."""
    from optuna.trial import TrialState

    ended = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=ended) if t.user_attrs.get("error") != "interrupted"]


def trial_runner(
    data: str, preset_name: str, output: Path, space: list[Dimension], fixed: dict, device: str, trials: int
):
    """Optuna's objective: one training run with the trial's settings, its best validation
    accuracy (the accuracy of the checkpoint it keeps; the test split is never looked at)."""

    def run_trial(trial) -> float:
        settings = {dimension.name: suggest(trial, dimension) for dimension in space}
        folder = output / f"trial-{trial.number}"
        trial.set_user_attr("folder", folder.name)
        shown = ", ".join(
            f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}" for name, value in settings.items()
        )
        print(f"trial {trial.number} ({len(counted(trial.study)) + 1} of {trials}): {shown}", flush=True)
        started = time.monotonic()
        try:
            result = train(data, preset_name, folder, device=device, overwrite=True, **fixed, **settings)
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            raise
        except Exception as error:  # any failure is this trial's, recorded; the study goes on
            reason = f"{type(error).__name__}: {first_line(error)}"
            trial.set_user_attr("error", reason)
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
            print(f"trial {trial.number} failed: {reason}", flush=True)
            raise
        value = max(result["val_accuracy"])
        trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
        trial.set_user_attr("clearml", result["clearml"])
        print(
            f"trial {trial.number}: best valid accuracy {value:.4f} in {time.monotonic() - started:.0f} s", flush=True
        )
        return value

    return run_trial


def tracked_report(output: Path, figure, summary: dict) -> str:
    """The study's own offline ClearML task, opened once the trials are done (a task open
    during them would take their reports): the plot, the trials table and optimize.json."""
    with open_task("optimize", "optimizer", output, title="optimize (local study)") as tracker:
        tracker.figure("objective by trial and by setting", figure)
        tracker.table("trials", trials_table(summary))
        tracker.artifact("optimize.json", summary)
    return tracker.session
