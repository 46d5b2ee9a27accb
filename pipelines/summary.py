"""The run's summary: ``summary.json``, a table on stdout and a self-contained HTML report
with the plots, for the local mode where there is no web UI to look at."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from components.atomic import atomic_path, write_json
from components.tracking import open_task


def build_summary(mode: str, preset: str, steps: dict[str, dict]) -> dict:
    fetched, trained, evaluated, highres = (steps[k] for k in ("fetch_data", "train", "evaluate", "highres"))
    return {
        "mode": mode,
        "dataset": {key: fetched[key] for key in ("source", "version", "classes", "counts")},
        "train": {
            "preset": preset,
            "epochs": trained["epochs"][-1],
            "image_size": trained["image_size"],
            "train_loss": trained["train_loss"],
            "val_accuracy": trained["val_accuracy"],
            "checkpoint": trained["model_id"] or trained["checkpoint"],
        },
        "evaluate": {key: evaluated[key] for key in ("image_size", "test_accuracy", "test_loss")},
        "highres": {
            key: highres[key]
            for key in (
                "image_size",
                "test_accuracy_bilinear",
                "test_accuracy_bicubic",
                "test_accuracy_bicubic_calibrated",
                "attention_scale",
                "test_accuracy_finetuned",
                "finetune_kept",
                "test_accuracy_finetuned_interpolated",
            )
        },
        "benchmark": {"rows": steps["benchmark_attention"]["rows"]},
        "clearml": {name: result["clearml"] for name, result in steps.items()},
    }


def results_table(summary: dict) -> pd.DataFrame:
    """Accuracy at the training size and at 384, and the attention speed-ups, one row each."""
    evaluated, highres = summary["evaluate"], summary["highres"]
    size = highres["image_size"]
    kept = "part" if highres["finetune_kept"] is None else f"x{highres['finetune_kept']:.2f}"
    accuracies = {
        f"test accuracy @ {evaluated['image_size']}": evaluated["test_accuracy"],
        f"test accuracy @ {size}, bilinear pos-embed": highres["test_accuracy_bilinear"],
        f"test accuracy @ {size}, bicubic pos-embed": highres["test_accuracy_bicubic"],
        f"test accuracy @ {size}, bicubic, attention x{highres['attention_scale']:.2f}": highres[
            "test_accuracy_bicubic_calibrated"
        ],
        f"test accuracy @ {size}, bicubic + fine-tuned": highres["test_accuracy_finetuned"],
        f"test accuracy @ {size}, fine-tuned, {kept} of its change kept": highres[
            "test_accuracy_finetuned_interpolated"
        ],
    }
    rows = [(name, "-" if value is None else f"{value:.4f}") for name, value in accuracies.items()]
    benchmark = pd.DataFrame(summary["benchmark"]["rows"])
    for (scope, dtype, impl), group in benchmark.groupby(["scope", "dtype", "impl"], sort=False):
        if impl != "separate":
            low, high = group["speedup_vs_separate"].min(), group["speedup_vs_separate"].max()
            rows.append((f"{impl} vs separate: {scope}, {dtype}, fwd+bwd", f"x{low:.2f} to x{high:.2f}"))
    return pd.DataFrame(rows, columns=["result", "value"])


def write_report(summary: dict, table: pd.DataFrame, plots: list[Path], path: Path) -> Path:
    """One HTML file with the table and every plot embedded, to open in any browser."""
    sessions = [value for value in summary["clearml"].values() if str(value).endswith(".zip")]
    images = "\n".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(plot.name)}</figcaption></figure>"
        for plot in plots
        if plot.is_file()
    )
    title = f"preset {summary['train']['preset']} on data version {summary['dataset']['version']}"
    imports = "\n".join(f"clearml-task --import-offline-session {html.escape(str(s))}" for s in sessions)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Headgear ViT run</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px}} figure{{margin:1em 0}}
</style></head>
<body><h1>Headgear ViT: {html.escape(title)}</h1>
{table.to_html(index=False)}
<h2>Plots</h2>{images}
<h2>Push the offline sessions to a ClearML server</h2><pre>{imports}</pre></body></html>"""
    with atomic_path(path) as temporary:
        temporary.write_text(page)
    return path


def write_summary(mode: str, preset: str, steps: dict[str, dict], output: Path) -> dict:
    """Writes ``summary.json`` and ``report.html`` into ``output``, prints the table and the
    command that imports the offline sessions; returns the summary. As a pipeline step (its
    task already running, left open for the step's return values), both files are also
    uploaded as artifacts of that task: the step's container is thrown away."""
    output = Path(output)
    with open_task("summary", "custom", output / "summary") as tracker:
        summary = build_summary(mode, preset, steps)
        table = results_table(summary)
        tracker.table("results", table)
        tracker.artifact("summary", summary)
    summary["clearml"]["summary"] = tracker.session
    plots = [Path(plot) for result in steps.values() for plot in result.get("plots", [])]
    write_report(summary, table, plots, output / "report.html")
    write_json(summary, output / "summary.json")
    if tracker.reused:
        tracker.artifact("report.html", output / "report.html")
        tracker.artifact("summary.json", output / "summary.json")
    print("\n" + table.to_string(index=False))
    print(f"\nsummary: {output / 'summary.json'}\nreport:  {output / 'report.html'}")
    if mode == "local":
        print("push the offline sessions to a ClearML server with:")
        for session in summary["clearml"].values():
            print(f"  clearml-task --import-offline-session '{session}'")
    return summary
