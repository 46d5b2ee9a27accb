"""The pipeline's steps: thin wrappers that call one component each.

Each function is self-contained (its imports inside), because in server mode ClearML copies
its source into a generated script that an agent runs at the root of a fresh clone of the
repository (Python puts the script's folder, the clone's root, first on ``sys.path``, so
``components`` imports from the clone), after the script's own ``Task.init``: the component
reports into that task, and
the script uploads what the step returns (an id or a result dict, never a path: the next
step runs in another container). No ``from __future__`` import here: the script would place
it after its own header, a SyntaxError. The local runner calls the same functions, one child
process per step:

    python -m pipelines.steps STEP KWARGS.json RESULT.json

A step returns its ``returns`` in ``pipelines/run_pipeline.py``: a tuple in that order, or the
one value itself (ClearML's script stores a returned tuple whole when one name is declared).
Numbers are cast on the way in: pipeline parameters reach an agent's step as strings.
``output`` is keyword-only, so ClearML does not make it a step parameter: on an agent each step
writes into ``outputs/`` of its own clone; the local runner passes the run folder.
"""

# The one module-level import, copied into each generated script before its Task.init: torch is
# then imported whole before ClearML's background threads, which also import it, can race it.
import torch


def fetch_data_step(source: str, *, output: str = "outputs"):
    from pathlib import Path

    from components.common.tracking import upload_plots
    from components.fetch_data import fetch_data

    result = upload_plots(fetch_data(source, Path(output) / "fetch_data"))
    return result["data"], result


def train_step(
    data: str,
    preset: str,
    epochs: int,
    seed: int,
    init: str,
    settings: str = "{}",
    nodes: int = 1,
    *,
    output: str = "outputs",
):
    import json
    from pathlib import Path

    from components.common.distributed import machines, ranks_per_machine
    from components.common.tracking import upload_plots
    from components.train import train

    # The preset's settings overridden by ``settings`` (a JSON object, e.g. a search's best), then by the flags.
    overrides = {**json.loads(settings or "{}"), "seed": int(seed)}
    if int(epochs) > 0:  # 0: the preset's
        overrides["epochs"] = int(epochs)
    if init:  # empty: the preset's (from scratch, or the finetune preset's timm weights)
        overrides["init"] = init
    # Data-parallel over every GPU of the machine, and over the agents of ``nodes`` machines.
    ranks = ranks_per_machine("auto")
    node = machines(int(nodes)) if int(nodes) > 1 else None
    # The folder is the run's own: the local runner holds the run folder, an agent a fresh clone.
    where = dict(overwrite=True, ranks_per_node=ranks, node=node)
    result = train(data, preset, Path(output) / "train", **where, **overrides)
    if result is None:  # a machine other than the first of several: its ranks report nothing
        return None, None
    return result["model"], upload_plots(result)


def evaluate_step(checkpoint: str, data: str, *, output: str = "outputs"):
    from pathlib import Path

    from components.common.tracking import report_results, upload_plots
    from components.evaluate import evaluate
    from pipelines.page import RESULTS, TEST_ACCURACY

    result = upload_plots(evaluate(checkpoint, data, Path(output) / "evaluate" / "evaluate.json"))
    report_results(RESULTS, {TEST_ACCURACY: result["test_accuracy"]})
    return result


def highres_step(checkpoint: str, data: str, image_size: int, finetune_steps: int, *, output: str = "outputs"):
    from pathlib import Path

    from components.common.presets import FinetuneConfig
    from components.common.tracking import report_results, upload_plots
    from components.highres import highres
    from pipelines.page import HIGHRES_ACCURACY, RESULTS

    output_json = Path(output) / "highres" / "highres.json"
    tuning = FinetuneConfig(steps=int(finetune_steps))
    result = upload_plots(highres(checkpoint, data, output_json, int(image_size), tuning))
    report_results(RESULTS, {series: result[key] for key, series in HIGHRES_ACCURACY.items()})
    return result


def benchmark_step(sweep: str, *, output: str = "outputs"):
    from pathlib import Path

    from components.benchmark_attention import benchmark_attention
    from components.common.tracking import report_results, upload_plots
    from pipelines.page import RESULTS, speedup_series

    quick = sweep == "quick" or (sweep == "auto" and not torch.cuda.is_available())
    output_json = Path(output) / "benchmark_attention" / "benchmark.json"
    result = upload_plots(benchmark_attention(output_json, quick=quick))
    best = {}
    for row in result["rows"]:
        if row["impl"] != "separate":
            series = speedup_series(row["impl"])
            best[series] = max(best.get(series, 0.0), row["speedup_vs_separate"])
    report_results(RESULTS, best)
    return result


def summary_step(
    preset: str,
    fetched: dict,
    trained: dict,
    evaluated: dict,
    highres: dict,
    benchmark: dict,
    *,
    mode: str = "server",
    output: str = "outputs",
    step_seconds: dict | None = None,
):
    from pathlib import Path

    from components.common.tracking import download_plots, task_seconds
    from pipelines.summary import write_summary

    steps = {
        "fetch_data": fetched,
        "train": trained,
        "evaluate": evaluated,
        "highres": highres,
        "benchmark_attention": benchmark,
    }
    if mode == "server":  # the plots were written in the other steps' containers, timed by the server
        steps = {name: download_plots(result, Path(output) / "plots" / name) for name, result in steps.items()}
        step_seconds = {name: task_seconds(result["clearml"]) for name, result in steps.items()}
    return write_summary(mode, preset, steps, Path(output), step_seconds)


def main() -> None:
    import json
    import sys
    from pathlib import Path

    from components.common.atomic import write_json

    name, kwargs_path, result_path = sys.argv[1:4]
    step = globals()[name]
    returned = step(**json.loads(Path(kwargs_path).read_text()))
    write_json(list(returned) if isinstance(returned, tuple) else [returned], Path(result_path))


if __name__ == "__main__":
    main()
