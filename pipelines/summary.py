"""The run's summary: ``summary.json``, a table on stdout and a self-contained HTML report
with the plots, for the local mode where there is no web UI to look at."""

from __future__ import annotations

import base64
import html
import platform
from pathlib import Path

import pandas as pd

from components.common.atomic import atomic_path, write_json
from components.common.tracking import open_task
from pipelines import checkout


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
            "checkpoint": trained["model"],
        },
        "evaluate": {key: evaluated[key] for key in ("image_size", "test_accuracy", "test_loss")},
        "highres": highres_part(highres),
        "benchmark": {"rows": steps["benchmark_attention"]["rows"]},
        "clearml": {name: result["clearml"] for name, result in steps.items()},
    }


def highres_part(highres: dict) -> dict:
    """What the summary keeps of highres' result: the new size, each variant's test accuracy
    and the number each variant chose on the validation split."""
    variants = highres["variants"]
    return {
        "image_size": highres["image_size"],
        **{f"test_accuracy_{variant['name']}": variant["test_accuracy"] for variant in variants},
        **{variant["chose"]: highres[variant["chose"]] for variant in variants if variant["chose"]},
    }


def results_table(summary: dict, highres: dict) -> pd.DataFrame:
    """Accuracy at the training size and at the high resolution, and the attention speed-ups,
    one row each, with what the row means."""
    evaluated = summary["evaluate"]
    native, size, n_test = evaluated["image_size"], highres["image_size"], summary["dataset"]["counts"]["test"]
    accuracies = [
        (
            f"test accuracy @ {native}",
            evaluated["test_accuracy"],
            f"share of the {n_test} test images classified correctly at the training size",
        ),
        *(
            (f"test accuracy @ {size}, {variant['label']}", variant["test_accuracy"], variant["meaning"])
            for variant in highres["variants"]
        ),
    ]
    rows = [(name, "-" if value is None else f"{value:.2%}", meaning) for name, value, meaning in accuracies]
    benchmark = pd.DataFrame(summary["benchmark"]["rows"])
    for (scope, dtype, impl), group in benchmark.groupby(["scope", "dtype", "impl"], sort=False):
        if impl != "separate":
            low, high = group["speedup_vs_separate"].min(), group["speedup_vs_separate"].max()
            rows.append(
                (
                    f"{impl} vs separate: {scope}, {dtype}, fwd+bwd",
                    f"x{low:.2f} to x{high:.2f}",
                    f"how many times faster the {scope}'s forward + backward is than with separate layers, "
                    "lowest to highest over the batch and image sizes timed",
                )
            )
    return pd.DataFrame(rows, columns=["result", "value", "what it means"])


def run_facts(summary: dict, steps: dict[str, dict], step_seconds: dict[str, float] | None) -> list[tuple[str, str]]:
    """What ran, as (name, value) pairs for the report's header."""
    dataset, trained = summary["dataset"], steps["train"]
    config = trained["config"]
    counts = ", ".join(f"{count:,} {split}" for split, count in dataset["counts"].items())
    settings = ", ".join(
        f"{name.replace('_', ' ')} {config[name]}"
        for name in ("model", "image_size", "train_sizes", "epochs", "batch_size", "lr", "crop_scale")
        if config[name] != ""
    )
    augmentation = [f"{name.replace('_', ' ')} {config[name]}" for name in AUGMENTATIONS if config[name]]
    facts = [
        ("data", f"{dataset['source']}, version {dataset['version']}: {len(dataset['classes'])} classes, {counts}"),
        ("preset", f"{summary['train']['preset']}: {settings}; {', '.join(augmentation) or 'no mixing or erasing'}"),
        ("seed", str(config["seed"])),
        ("commit", checkout.described()),
        ("machine", f"{platform.platform()}; trained on {trained['device']}"),
        (
            "versions",
            f"python {platform.python_version()}, "
            + ", ".join(f"{package} {version}" for package, version in trained["versions"].items()),
        ),
    ]
    if step_seconds:
        facts.append(("wall time", ", ".join(f"{step} {s:.0f} s" for step, s in step_seconds.items() if s is not None)))
    return facts


AUGMENTATIONS = ("rand_augment", "random_erasing", "mixup_alpha", "cutmix_alpha", "ema_decay")


REPORT_STYLE = """body{font-family:sans-serif;max-width:1000px;margin:1.5em auto;padding:0 1.5em;line-height:1.4}
img{max-width:100%;height:auto} figure{margin:1.5em 0} figcaption{font-size:0.9em;color:#333}
table{border-collapse:collapse;margin:0.5em 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top} th{background:#f3f3f3} dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 1em}
dl.facts dt{font-weight:bold} dl.facts dd{margin:0;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:0.6em}"""


def write_report(
    summary: dict, table: pd.DataFrame, steps: dict[str, dict], path: Path, step_seconds: dict[str, float] | None = None
) -> Path:
    """One HTML file, to open in any browser or forward: what ran, the results table, every
    plot embedded with its caption, and the commands that push the offline sessions."""
    facts = "".join(
        f"<dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>"
        for name, value in run_facts(summary, steps, step_seconds)
    )
    plots = [plot for result in steps.values() for plot in result.get("plots", []) if Path(plot["path"]).is_file()]
    images = "\n".join(
        f'<figure><img alt="{html.escape(plot["caption"])}" '
        f'src="data:image/png;base64,{base64.b64encode(Path(plot["path"]).read_bytes()).decode()}">'
        f"<figcaption>{html.escape(plot['caption'])}</figcaption></figure>"
        for plot in plots
    )
    sessions = [value for value in summary["clearml"].values() if str(value).endswith(".zip")]
    imports = "\n".join(f"clearml-task --import-offline-session {html.escape(str(s))}" for s in sessions)
    pushing = (
        f"<h2>Push the offline sessions to a ClearML server</h2><pre>{imports}</pre>"
        if sessions
        else "<p>The steps ran on a ClearML server: their tasks are in its web UI.</p>"
    )
    title = f"preset {summary['train']['preset']} on data version {summary['dataset']['version']}"
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Headgear ViT: {html.escape(title)}</title>
<style>{REPORT_STYLE}</style></head>
<body><h1>Headgear ViT: {html.escape(title)}</h1>
<h2>What ran</h2><dl class="facts">{facts}</dl>
<h2>Results</h2>{table.to_html(index=False, border=0)}
<p>Accuracies are the share of test images classified correctly; the speed-ups, how many times faster than
separate Q, K, V layers.</p>
<h2>Plots</h2>{images}
{pushing}</body></html>"""
    with atomic_path(path) as temporary:
        temporary.write_text(page)
    return path


def write_summary(
    mode: str, preset: str, steps: dict[str, dict], output: Path, step_seconds: dict[str, float] | None = None
) -> dict:
    """Writes ``summary.json`` and ``report.html`` into ``output``, prints the table and the
    command that imports the offline sessions; returns the summary. ``step_seconds``: each
    step's wall time, shown in the report when given. As a pipeline step (its task already
    running, left open for the step's return values), both files are also uploaded as artifacts
    of that task: the step's container is thrown away."""
    output = Path(output)
    with open_task("summary", "custom", output / "summary") as tracker:
        summary = build_summary(mode, preset, steps)
        table = results_table(summary, steps["highres"])
        tracker.table("results", table)
        tracker.artifact("summary", summary)
    summary["clearml"]["summary"] = tracker.session
    write_report(summary, table, steps, output / "report.html", step_seconds)
    write_json(summary, output / "summary.json")
    if tracker.reused:
        tracker.artifact("report.html", output / "report.html")
        tracker.artifact("summary.json", output / "summary.json")
    print("\n" + table[["result", "value"]].to_string(index=False))
    print(f"\nsummary: {output / 'summary.json'}\nreport:  {output / 'report.html'}")
    if mode == "local":
        print("push the offline sessions to a ClearML server with:")
        for session in summary["clearml"].values():
            print(f"  clearml-task --import-offline-session '{session}'")
    return summary
