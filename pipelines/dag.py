"""The pipeline's DAG, defined once for both ways to run it (`pipelines.local`, `pipelines.server`).

    fetch_data ──► train ──┬──► evaluate               (test accuracy at the training size)
                           └──► highres                (pos-embed resize, evaluation at 384, fine-tune)
    benchmark_attention                                (separate vs fused Q/K/V, SDPA, timm)
                  all ──► summary                      (summary.json, report.html)

A step's kwargs are plain values, ``${pipeline.NAME}`` (a pipeline parameter) or
``${STEP.RETURN}`` (what an earlier step returned): ClearML's syntax, which the local runner
resolves itself.
"""

from collections.abc import Callable
from dataclasses import dataclass

from components.common.presets import HIGHRES_SIZE, PRESETS, architecture
from model import ATTENTION_IMPLEMENTATIONS
from pipelines import page, steps


@dataclass(frozen=True)
class Step:
    function: Callable
    kwargs: dict
    returns: tuple[str, ...]
    parents: tuple[str, ...] = ()
    task_type: str = "custom"  # ClearML's task type, shown and filtered on in the web UI
    gpu: bool = True  # False: enqueued on --cpu-queue
    monitor_metrics: tuple[tuple[str, str], ...] = ()  # shown on the pipeline's own page
    registers_model: bool = False  # its model (named after the step on its task) is shown on the pipeline's page


DAG: dict[str, Step] = {
    "fetch_data": Step(
        steps.fetch_data_step,
        {"source": "${pipeline.data}"},
        returns=("data", "result"),
        task_type="data_processing",
        gpu=False,
    ),
    "train": Step(
        steps.train_step,
        {
            "data": "${fetch_data.data}",
            "preset": "${pipeline.preset}",
            "epochs": "${pipeline.epochs}",
            "seed": "${pipeline.seed}",
            "init": "${pipeline.init}",
            "settings": "${pipeline.settings}",
            "nodes": "${pipeline.nodes}",
        },
        returns=("checkpoint", "result"),
        parents=("fetch_data",),
        task_type="training",
        registers_model=True,
    ),
    "evaluate": Step(
        steps.evaluate_step,
        {"checkpoint": "${train.checkpoint}", "data": "${fetch_data.data}"},
        returns=("result",),
        parents=("fetch_data", "train"),
        task_type="testing",
        monitor_metrics=((page.RESULTS, page.TEST_ACCURACY),),
    ),
    "highres": Step(
        steps.highres_step,
        {
            "checkpoint": "${train.checkpoint}",
            "data": "${fetch_data.data}",
            "image_size": "${pipeline.highres_size}",
            "finetune_steps": "${pipeline.finetune_steps}",
        },
        returns=("result",),
        parents=("fetch_data", "train"),
        task_type="testing",
        monitor_metrics=tuple((page.RESULTS, series) for series in page.HIGHRES_ACCURACY.values()),
        registers_model=True,
    ),
    "benchmark_attention": Step(
        steps.benchmark_step,
        {"sweep": "${pipeline.benchmark}"},
        returns=("result",),
        task_type="qc",
        monitor_metrics=tuple((page.RESULTS, page.speedup_series(impl)) for impl in ATTENTION_IMPLEMENTATIONS[1:]),
    ),
    "summary": Step(
        steps.summary_step,
        {
            "preset": "${pipeline.preset}",
            "fetched": "${fetch_data.result}",
            "trained": "${train.result}",
            "evaluated": "${evaluate.result}",
            "highres": "${highres.result}",
            "benchmark": "${benchmark_attention.result}",
        },
        returns=("result",),
        parents=("fetch_data", "train", "evaluate", "highres", "benchmark_attention"),
        gpu=False,
    ),
}

PARAMETER_HELP = {
    "data": "'kaggle', or a zip / folder in the headgear layout, or a ClearML Dataset id",
    "preset": f"training preset: {', '.join(PRESETS)}",
    "epochs": "training epochs; 0 keeps the preset's",
    "seed": "random seed of the training run",
    "init": "initial weights: timm:<model name>, or a ClearML model id (server mode) or a .pt file (local mode); "
    "empty: the preset's",
    "settings": "training settings over the preset's, a JSON object {setting: value} (optimize.py's best.json); "
    "epochs, seed and init win over it",
    "nodes": "machines (agents) the train step runs data-parallel on, each with all of its GPUs",
    "highres_size": "image size of the high-resolution evaluation",
    "finetune_steps": "SGD steps of the fine-tune at the high resolution; 0 skips it",
    "benchmark": "attention benchmark sweep: auto (full on a GPU, quick on a CPU), quick or full",
}


def default_highres_size(preset: str) -> int:
    """384 for a preset at 224; for others, the same 384/224 ratio rounded to the patch size."""
    config = PRESETS[preset]
    patch = architecture(config)["patch_size"]
    return max(1, round(config.image_size * HIGHRES_SIZE / 224 / patch)) * patch
