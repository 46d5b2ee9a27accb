"""benchmark_attention: separate vs fused Q/K/V projections (and PyTorch's SDPA kernels).

The same weights in every implementation: first checked to compute the same outputs, then
timed, forward and forward+backward, for the attention module alone and for the whole
model, over batch sizes, 224 and 384 inputs (197 and 577 tokens at patch 16), fp32 and (on a
GPU) bf16 autocast, at the widths of ViT-Ti/16 and ViT-S/16. timm's ``Attention`` and
``VisionTransformer`` of the same configuration (fused attention on) are measured in the
same run, when timm is installed, as the reference to beat.

Timing: ``torch.utils.benchmark`` (warm-up, repeats until a minimum time, median; it
synchronises the GPU around each measurement); peak memory of forward+backward on a GPU.

    python -m components.benchmark_attention --output-json benchmark.json [--device cuda] [--quick]
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from components.common import cli
from components.common.atomic import atomic_path, write_json
from components.common.devices import describe_device, pick_device
from components.common.plots import grouped_bars_figure
from components.common.tracking import open_task
from model import ATTENTION_IMPLEMENTATIONS, MODEL_PRESETS, MultiHeadSelfAttention, ViT
from model.timm_convert import state_dict_to_timm, timm_vit

# torch.utils.benchmark imports cpp_extension, which warns "No CUDA runtime is found" on every
# CPU machine with a CUDA toolkit installed; nothing here compiles an extension.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark as torch_benchmark  # noqa: E402

PATCH_SIZE = 16
IMAGE_SIZES = (224, 384)


@dataclass(frozen=True)
class Sweep:
    widths: tuple[str, ...]  # model presets whose width and depth are measured
    batch_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    min_run_time: float  # seconds of repeats per measurement


def sweep_for(device: torch.device, quick: bool) -> Sweep:
    dtypes = ("float32", "bfloat16") if device.type == "cuda" else ("float32",)
    if quick:
        return Sweep(("vit-tiny-test",), (2,), dtypes, 0.02)
    if device.type == "cuda":
        return Sweep(("vit-ti16", "vit-s16"), (32, 128), dtypes, 0.05)
    return Sweep(("vit-ti16", "vit-s16"), (8,), dtypes, 0.5)


def _timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def build_modules(scope: str, width: str, image_size: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """One module per implementation, all holding the same weights (and timm's, if installed)."""
    config = {**MODEL_PRESETS[width], "patch_size": PATCH_SIZE}
    heads, head_dim, dim = config["n_heads"], config["qkv_dim"], config["embed_dim"]
    torch.manual_seed(0)
    if scope == "attention":
        reference = MultiHeadSelfAttention(dim, head_dim, heads, dropout_rate=0.0, attention="fused")
        modules = {}
        for impl in ATTENTION_IMPLEMENTATIONS:
            modules[impl] = MultiHeadSelfAttention(dim, head_dim, heads, dropout_rate=0.0, attention=impl)
            modules[impl].load_state_dict(reference.state_dict())
        if _timm_available() and dim == heads * head_dim:
            from timm.layers import Attention

            modules["timm"] = Attention(dim, num_heads=heads, qkv_bias=True)
            modules["timm"].fused_attn = True
            modules["timm"].load_state_dict(reference.state_dict())
    else:
        reference = ViT(image_size=image_size, n_classes=1000, attention="fused", **config)
        torch.nn.init.normal_(reference.head.weight, std=0.02)  # the paper's zero head would make outputs agree
        modules = {impl: reference.to_attention(impl) for impl in ATTENTION_IMPLEMENTATIONS}
        if _timm_available() and dim == heads * head_dim:
            modules["timm"] = timm_vit(config, image_size, n_classes=1000)
            modules["timm"].load_state_dict(state_dict_to_timm(reference.state_dict(), reference.config["patch_size"]))
    return {impl: module.to(device).eval() for impl, module in modules.items()}


def check_agreement(modules: dict, inputs: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuses to time implementations that do not compute the same function."""
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad(), torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
        outputs = {impl: module(inputs).float() for impl, module in modules.items()}
    scale = outputs["separate"].abs().max().item() + 1e-6
    for impl, output in outputs.items():
        error = (output - outputs["separate"]).abs().max().item() / scale
        if error > tolerance:
            raise AssertionError(f"{impl} differs from separate by {error:.2e} (relative) > {tolerance:.0e}")


def time_ms(function, min_run_time: float) -> float:
    timer = torch_benchmark.Timer(stmt="function()", globals={"function": function})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure(module: torch.nn.Module, inputs: torch.Tensor, dtype: torch.dtype, min_run_time: float) -> dict:
    autocast = torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        with torch.no_grad(), autocast:
            module(inputs)

    def forward_backward():
        with autocast:
            output = module(inputs)
        output.float().square().mean().backward()
        for parameter in module.parameters():
            parameter.grad = None

    cuda = inputs.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    forward_backward()  # warm-up, and the peak memory of one training step
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {
        "fwd_ms": time_ms(forward, min_run_time),
        "fwd_bwd_ms": time_ms(forward_backward, min_run_time),
        "peak_mem_mb": peak,
    }


def run_sweep(device: torch.device, sweep: Sweep) -> list[dict]:
    rows = []
    for width in sweep.widths:
        dim = MODEL_PRESETS[width]["embed_dim"]
        for scope in ("attention", "model"):
            for image_size in IMAGE_SIZES:
                tokens = 1 + (image_size // PATCH_SIZE) ** 2
                modules = build_modules(scope, width, image_size, device)
                for dtype_name in sweep.dtypes:
                    dtype = getattr(torch, dtype_name)
                    for batch_size in sweep.batch_sizes:
                        torch.manual_seed(1)
                        shape = (
                            (batch_size, tokens, dim)
                            if scope == "attention"
                            else (batch_size, 3, image_size, image_size)
                        )
                        inputs = torch.randn(shape, device=device)
                        check_agreement(modules, inputs, dtype)
                        group = []
                        for impl, module in modules.items():
                            timing = measure(module, inputs, dtype, sweep.min_run_time)
                            group.append(
                                {
                                    "impl": impl,
                                    "scope": scope,
                                    "width": width,
                                    "device": device.type,
                                    "dtype": dtype_name,
                                    "batch_size": batch_size,
                                    "image_size": image_size,
                                    "tokens": tokens,
                                    **timing,
                                }
                            )
                        separate = next(row for row in group if row["impl"] == "separate")
                        for row in group:
                            row["speedup_vs_separate"] = separate["fwd_bwd_ms"] / row["fwd_bwd_ms"]
                            row["fwd_speedup_vs_separate"] = separate["fwd_ms"] / row["fwd_ms"]
                            print(_format_row(row), flush=True)
                        rows.extend(group)
    return rows


def _format_row(row: dict) -> str:
    return (
        f"{row['scope']:<9} {row['width']:<13} {row['dtype']:<8} bs={row['batch_size']:<4} "
        f"{row['image_size']}px {row['impl']:<8} fwd {row['fwd_ms']:9.3f} ms  fwd+bwd {row['fwd_bwd_ms']:9.3f} ms  "
        f"x{row['speedup_vs_separate']:.2f} vs separate"
    )


def benchmark_attention(output_json: Path, device: str = "auto", quick: bool = False) -> dict:
    """Runs the sweep and returns ``{"rows": [...], "device_name", "torch", "clearml"}``; also
    written to ``output_json`` and, as CSV, beside it."""
    output_json = Path(output_json)
    device = pick_device(device)
    with open_task(output_json.stem, "qc", output_json.parent, title="benchmark attention") as tracker:
        params = tracker.connect({"device": device.type, "quick": quick})
        sweep = sweep_for(device, params["quick"])
        rows = run_sweep(device, sweep)
        frame = pd.DataFrame(rows)
        tracker.table("attention benchmark", frame.round(4))
        figure = speedup_figure(frame)
        figure.savefig(output_json.with_suffix(".png"), dpi=120)
        tracker.figure("speed-up vs separate (forward+backward)", figure)
        result = {
            "rows": rows,
            "device_name": describe_device(device),
            "torch": torch.__version__,
            "plots": [
                {
                    "path": str(output_json.with_suffix(".png")),
                    "caption": "Speed of each attention implementation against separate Q, K, V layers per head, "
                    "forward + backward, one group of bars per setting (module or whole model, width, number "
                    "type, batch size, image size). A bar above 1 is that many times faster than separate.",
                }
            ],
        }
        tracker.artifact("benchmark", result)
    result["clearml"] = tracker.session
    write_json(result, output_json)
    with atomic_path(output_json.with_suffix(".csv")) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return result


def speedup_figure(frame: pd.DataFrame):
    keys = ["scope", "width", "dtype", "batch_size", "image_size"]
    groups = frame.groupby(keys, sort=False)
    labels = [f"{s} {w} {d} bs{b} {i}px" for s, w, d, b, i in groups.groups]
    speedups = frame.set_index([*keys, "impl"])["speedup_vs_separate"]
    bars = {impl: [speedups.get((*group, impl), 0.0) for group in groups.groups] for impl in frame["impl"].unique()}
    return grouped_bars_figure(
        labels,
        bars,
        "setting: attention module or whole model, width, number type, batch size, image size",
        "speed-up vs separate (times faster)",
        f"attention implementations, forward + backward, on the {frame['device'].iloc[0]}",
    )


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("benchmark_attention", __doc__)
    parser.add_argument(
        "--output-json", type=cli.output_file, required=True, help="where the rows go (a .csv is written beside)"
    )
    cli.add_device_flag(parser)
    parser.add_argument("--quick", action="store_true", help="the tiny preset's width, batch 2: a quick check")
    args = parser.parse_args(argv)
    cli.run(parser, benchmark_attention, args.output_json, args.device, args.quick)
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
