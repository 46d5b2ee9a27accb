"""pipelines/terminal_log.py: a real tqdm bar with messages written through it, in chunks that
split lines anywhere, reads as plain lines."""

from __future__ import annotations

import io

from tqdm import tqdm

from pipelines.terminal_log import TerminalLog


def test_a_progress_bar_leaves_plain_lines_with_its_messages_and_final_state(tmp_path):
    console = io.StringIO()
    bar = tqdm(total=50, desc="train", unit="step", file=console, mininterval=0, ncols=80)
    for step in range(50):
        bar.update()
        if step % 10 == 9:
            bar.write(f"epoch {step // 10 + 1}/5: loss 1.0", file=console)
    bar.close()
    print("after the bar", file=console)
    raw = console.getvalue().encode()
    assert raw.count(b"\r") > 50  # the bar redrew itself in place

    path = tmp_path / "step.log"
    with TerminalLog(path.open("wb")) as log:
        for start in range(0, len(raw), 7):  # pipes hand over any number of bytes
            log.write(raw[start : start + 7])
    lines = path.read_text().splitlines()
    assert "\r" not in path.read_text()
    assert [line for line in lines if line.startswith("epoch")] == [f"epoch {i}/5: loss 1.0" for i in range(1, 6)]
    bars = [line for line in lines if line.startswith("train")]
    assert len(bars) == 1 and "50/50" in bars[0] and "100%" in bars[0]  # the bar once, as it ended
    assert lines[-1] == "after the bar"
