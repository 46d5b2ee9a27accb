"""Reading ClearML offline sessions back from their zips, as a server import would."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path


def read_session(archive: Path) -> dict:
    """{"task": task.json, "events": [metric events], "files": [names], "text": all text}"""
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        events = []
        for name in names:
            if name.endswith("metrics.jsonl"):
                for line in zf.read(name).decode().splitlines():
                    events.extend(json.loads(line))
        task = json.loads(zf.read(next(n for n in names if n.endswith("task.json"))))
        text = "\n".join(zf.read(n).decode("utf-8", "replace") for n in names)
    return {"task": task, "events": events, "files": names, "text": text}


def scalars(session: dict, metric: str, variant: str) -> list[float]:
    return [
        e["value"]
        for e in session["events"]
        if e.get("type") == "training_stats_scalar" and e["metric"] == metric and e["variant"] == variant
    ]
