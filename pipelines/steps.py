"""The pipeline's steps: thin wrappers that call one component each.

Each function is self-contained (its imports inside), because in server mode ClearML copies
its source into a task that an agent runs at the repository's root. The local runner calls
the same functions, one child process per step:

    python -m pipelines.steps STEP KWARGS.json RESULT.json

A step returns a tuple in the order of its ``returns`` in ``pipelines/run_pipeline.py``.
Numbers are cast on the way in: pipeline parameters reach an agent's step as strings.
"""

from __future__ import annotations


def fetch_data_step(source: str, output: str):
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, os.getcwd())
    from components.fetch_data import fetch_data

    result = fetch_data(source, Path(output) / "fetch_data")
    return result["dataset_id"] or result["path"], result


def train_step(data: str, preset: str, epochs: int, seed: int, output: str):
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, os.getcwd())
    from components.train import train

    overrides = {"epochs": int(epochs)} if int(epochs) > 0 else {}  # 0: the preset's
    result = train(data, preset, Path(output) / "train", seed=int(seed), **overrides)
    return result["model_id"] or result["checkpoint"], result


def evaluate_step(checkpoint: str, data: str, output: str):
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, os.getcwd())
    from components.evaluate import evaluate

    return (evaluate(checkpoint, data, Path(output) / "evaluate" / "evaluate.json"),)


def highres_step(checkpoint: str, data: str, image_size: int, finetune_steps: int, output: str):
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, os.getcwd())
    from components.highres import highres

    output_json = Path(output) / "highres" / "highres.json"
    return (highres(checkpoint, data, output_json, int(image_size), int(finetune_steps)),)


def benchmark_step(mode: str, output: str):
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, os.getcwd())
    import torch

    from components.benchmark_attention import benchmark_attention

    quick = mode == "quick" or (mode == "auto" and not torch.cuda.is_available())
    return (benchmark_attention(Path(output) / "benchmark_attention" / "benchmark.json", quick=quick),)


def summary_step(
    mode: str, preset: str, fetched: dict, trained: dict, evaluated: dict, highres: dict, benchmark: dict, output: str
):
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, os.getcwd())
    from pipelines.summary import write_summary

    steps = {
        "fetch_data": fetched,
        "train": trained,
        "evaluate": evaluated,
        "highres": highres,
        "benchmark_attention": benchmark,
    }
    return (write_summary(mode, preset, steps, Path(output)),)


def main() -> None:
    import json
    import sys
    from pathlib import Path

    from components.atomic import write_json

    name, kwargs_path, result_path = sys.argv[1:4]
    step = globals()[name]
    returned = step(**json.loads(Path(kwargs_path).read_text()))
    write_json(list(returned), Path(result_path))


if __name__ == "__main__":
    main()
