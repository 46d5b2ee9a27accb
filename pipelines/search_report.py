"""What a local study leaves for people to read: ``optimize.json`` (every trial and the best),
``best.json`` (the best settings, for ``run_pipeline.py --params``) and ``optimize.png`` (the
objective by trial, and each setting against it)."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from components.common.plots import plt
from pipelines.search_space import Dimension

OBJECTIVE = "best validation accuracy"


def summarize(study, search_settings: dict) -> dict:
    """``{"search", "trials": [{"number", "params", "value", "state", "error", "folder",
    "seconds"}], "best": {"number", "params", "value", "folder"} or None}``; a state is
    ``complete``, ``fail``, ``pruned`` or ``running``, a failed trial's ``error`` its reason."""
    trials = [
        {
            "number": trial.number,
            "params": trial.params,
            "value": trial.value,
            "state": trial.state.name.lower(),
            "error": trial.user_attrs.get("error"),
            "folder": trial.user_attrs.get("folder"),
            "seconds": trial.user_attrs.get("seconds"),
        }
        for trial in study.get_trials(deepcopy=False)
    ]
    completed = [trial for trial in trials if trial["state"] == "complete"]
    best = max(completed, key=lambda trial: trial["value"], default=None)
    if best is not None:
        best = {key: best[key] for key in ("number", "params", "value", "folder")}
    return {"search": search_settings, "objective": OBJECTIVE, "trials": trials, "best": best}


def trials_table(summary: dict):
    """The trials as a table: one row each, its settings, objective, state and reason."""
    import pandas as pd

    rows = [
        {"trial": t["number"], **t["params"], OBJECTIVE: t["value"], "state": t["state"], "error": t["error"] or ""}
        for t in summary["trials"]
    ]
    return pd.DataFrame(rows).set_index("trial")


def study_figure(summary: dict, space: list[Dimension]):
    """The objective by trial (failed trials marked at the bottom, the best so far as a line),
    then one panel per setting: its value in each completed trial against the objective."""
    trials = summary["trials"]
    columns = min(4, 1 + len(space))
    rows = -(-(1 + len(space)) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.3 * rows), squeeze=False, layout="constrained")
    for axis in axes.flat[1 + len(space) :]:
        axis.axis("off")
    completed = [t for t in trials if t["state"] == "complete"]
    values = [t["value"] for t in completed]
    floor = min(values, default=0.0)
    axis = axes.flat[0]
    axis.plot([t["number"] for t in completed], values, "o", color="tab:blue", label="completed")
    axis.step(
        [t["number"] for t in completed],
        np.maximum.accumulate(values) if values else [],
        where="post",
        color="tab:green",
        label="best so far",
    )
    failed = [t["number"] for t in trials if t["state"] in ("fail", "pruned")]
    if failed:
        axis.plot(failed, [floor] * len(failed), "x", color="tab:red", label="failed or pruned (no value)")
    axis.set(xlabel="trial", ylabel=OBJECTIVE, title="objective by trial")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend(fontsize=7)
    best = summary["best"]
    for axis, dimension in zip(axes.flat[1:], space):
        setting = [t["params"].get(dimension.name) for t in completed]
        if dimension.choices:
            positions = {choice: index for index, choice in enumerate(dimension.choices)}
            axis.set_xticks(range(len(dimension.choices)), [str(c) for c in dimension.choices], fontsize=7)
            setting = [positions.get(value, np.nan) for value in setting]
            axis.set_xlim(-0.5, len(dimension.choices) - 0.5)
        elif dimension.log:  # the whole searched range, so that where the trials fell in it shows
            axis.set_xscale("log")
            axis.set_xlim(dimension.low / 1.15, dimension.high * 1.15)
        else:
            margin = (dimension.high - dimension.low) * 0.05
            axis.set_xlim(dimension.low - margin, dimension.high + margin)
        axis.plot(setting, values, "o", color="tab:blue", alpha=0.7)
        if best is not None:
            index = [t["number"] for t in completed].index(best["number"])
            axis.plot(setting[index], best["value"], "*", color="tab:orange", markersize=12)
        axis.set(xlabel=dimension.name, ylabel=OBJECTIVE, title=f"{dimension.name} against the objective")
    figure.suptitle(
        f"search over preset {summary['search']['preset']}: {len(completed)} of {len(trials)} trials completed "
        f"(orange star: the best)"
    )
    return figure
