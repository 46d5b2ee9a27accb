"""Training throughput: our ViT against timm's, in images/s and model FLOP utilisation (MFU).

Rows, all measured in one run on whatever device is present:

- model step: one training step (forward under bf16 autocast on a GPU, cross-entropy,
  backward, AdamW, fused on a GPU) on a fixed batch, eager and with torch.compile (its default
  mode, and reduce-overhead: with CUDA graphs, what the trainer uses on a GPU), for timm's
  VisionTransformer and for ours (``sdpa``, and ``separate`` eager, which still trains);
  the variants take turns, and each row is the median of ``--repeats`` rounds;
- augmentation: the training component's drawing (an epoch at a time) and its augmentation on
  the device alone, no model: the rate the model step must stay below for the augmentation
  never to be the bottleneck;
- training component: ``components.train`` end to end (drawing, augmentation, logging,
  validation, checkpoints) on a real archive, timed after its first epoch, eager and in each
  compile mode.

MFU = forward FLOPs x 3 (forward + backward) x images/s / the card's dense bf16 peak.

    python benchmarks/train_throughput.py --data fashion-mnist-headgear-layout.zip
    python benchmarks/train_throughput.py --small      # the CPU setting CI runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from components.common import cli
from components.common.augment import augment, endless_batches, len_epoch
from components.common.data import resolve
from components.common.devices import describe_device, mixed_precision, pick_device
from components.common.images import decode_split
from components.common.presets import preset as train_preset
from components.train import train
from model import MODEL_PRESETS, ViT
from model.timm_convert import timm_vit

PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
TIMM_NAMES = {"vit-ti16": "vit_tiny_patch16_224", "vit-s16": "vit_small_patch16_224"}


def forward_flops(config: dict, image_size: int) -> float:
    """Multiply-adds x 2 of one image's forward pass: patch embedding, per block the Q/K/V,
    attention scores, attention-weighted values, output projection and MLP, and the head."""
    d, p, heads, head_dim = config["embed_dim"], config["patch_size"], config["n_heads"], config["qkv_dim"]
    patches = (image_size // p) ** 2
    tokens, inner = patches + 1, heads * head_dim
    block = (
        3 * tokens * d * inner
        + 2 * tokens * tokens * inner
        + tokens * inner * d
        + 2 * tokens * d * config["mlp_hidden_size"]
    )
    return 2.0 * (patches * 3 * p * p * d + config["n_layers"] * block + d * config.get("n_classes", 1000))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in describe_device(device)), None)


def build(impl: str, preset: str, image_size: int, n_classes: int) -> torch.nn.Module:
    config = MODEL_PRESETS[preset]
    if impl == "timm":
        return timm_vit(config, image_size, n_classes)
    return ViT(image_size=image_size, n_classes=n_classes, attention=impl, **config)


def training_step(
    impl: str, preset: str, mode: str, batch_size: int, image_size: int, device: torch.device
) -> Callable[[], None]:
    """One training step of a fresh model on one fixed batch: forward (bf16 autocast on a GPU;
    ``mode`` eager or a torch.compile mode), cross-entropy, backward, AdamW (fused on a GPU)."""
    torch.manual_seed(0)
    model = build(impl, preset, image_size, n_classes=1000).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    forward = model if mode == "eager" else torch.compile(model, mode=mode)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    autocast = mixed_precision(device)

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def round_robin_throughput(
    steps_by_name: dict[str, Callable[[], None]],
    batch_size: int,
    steps: int,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> dict[str, float]:
    """Median images/s of each step function over ``repeats`` rounds of ``steps`` steps, the
    functions taking turns in every round, so that the GPU's clocks and temperature drifting
    over the run do not favour whichever was timed first."""
    for step in steps_by_name.values():
        for _ in range(warmup):  # compilation, autotuning, allocator warm-up
            step()
    samples = {name: [] for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples[name].append(steps * batch_size / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in samples.items()}


def augmentation_throughput(data: str, image_size: int, batch_size: int, batches: int, device: torch.device) -> float:
    """Images/s of the training component's drawing and the GPU recipe's augmentation on the
    device, over ``batches`` batches after a first untimed epoch."""
    config = train_preset("vit-ti16-224", image_size=image_size, batch_size=batch_size)
    images = torch.from_numpy(decode_split(resolve(data), "train", image_size)[0]).to(device)
    stream = endless_batches(len(images), config, device)
    for draws in itertools.islice(stream, len_epoch(len(images), batch_size)):
        augment(images, draws)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for draws in itertools.islice(stream, batches):
        augment(images, draws)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - started)


def component_throughput(
    data: str,
    preset: str,
    image_size: int,
    batch_size: int,
    epochs: int,
    mode: str,
    device: torch.device,
    output: Path,
) -> float:
    """Images/s of ``components.train`` after its first epoch."""
    result = train(
        data,
        "vit-ti16-224",
        output,
        device=device.type,
        model=preset,
        image_size=image_size,
        train_sizes=str(image_size),  # the model-step rows' one size, to compare with them
        batch_size=batch_size,
        epochs=epochs,
        compile="off" if mode == "eager" else mode,
        checkpoint_minutes=1.0,
    )
    return result["images_per_second"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="archive for the training-component rows (none: skip them)")
    cli.add_device_flag(parser)
    parser.add_argument("--models", default="vit-ti16,vit-s16", help="model presets (default: vit-ti16,vit-s16)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round of a model-step row (default: 30)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds, model-step rows; the median counts (default: 5)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    parser.add_argument(
        "--augment-batches", type=int, default=100, help="timed batches, augmentation row (default: 100)"
    )
    parser.add_argument("--component-epochs", type=int, default=8, help="epochs of the component rows (default: 8)")
    parser.add_argument(
        "--component-models", default="vit-ti16", help="models of the component rows (default: vit-ti16)"
    )
    parser.add_argument(
        "--compile-modes",
        default="default,reduce-overhead",
        help="torch.compile modes of the compiled rows (default: default,reduce-overhead)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--small", action="store_true", help="CPU setting: tiny model, 32x32, batch 8, 3 steps")
    parser.add_argument("--output-json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.small:
        args.models, args.batch_size, args.image_size, args.steps, args.warmup = "vit-tiny-test", 8, 32, 3, 1
        args.repeats = 2
        args.component_epochs, args.component_models, args.no_compile = 2, "vit-tiny-test", True
        args.augment_batches = 5
    return args


class Table:
    """The rows measured, each printed as it comes: images/s, and where a model's FLOPs are
    known, TFLOP/s and the share of the device's peak (MFU)."""

    def __init__(self, image_size: int, peak: float | None):
        self.image_size, self.peak, self.rows = image_size, peak, []

    def add(self, scope: str, impl: str, preset: str | None, mode: str, images_per_second: float) -> None:
        """One row; ``preset`` None for the augmentation, which has no FLOPs."""
        flops = 3 * forward_flops(MODEL_PRESETS[preset], self.image_size) * images_per_second if preset else None
        mfu = flops / self.peak if flops and self.peak else None
        self.rows.append(
            {
                "scope": scope,
                "impl": impl,
                "model": preset,
                "mode": mode,
                "images_per_second": images_per_second,
                "tflops": flops and flops / 1e12,
                "mfu": mfu,
            }
        )
        tflops = f"{flops / 1e12:8.2f} TFLOP/s" if flops else f"{'':>16}"
        shown = f"{mfu:.1%}" if mfu else "n/a"
        line = f"{scope:<18} {impl:<9} {preset or '':<13} {mode:<15} {images_per_second:10.1f} img/s {tflops}"
        print(f"{line}  MFU {shown}", flush=True)


def model_rows(table: Table, preset: str, modes: list[str], args: argparse.Namespace, device: torch.device) -> None:
    """The model-step rows of one model preset: ours (sdpa; separate eager) and timm's, each mode."""
    variants = [
        (impl, mode)
        for mode in modes
        for impl in ["timm", "sdpa"] + (["separate"] if mode == "eager" else [])
        if impl != "timm" or preset in TIMM_NAMES or args.small
    ]
    steps = {
        (impl, mode): training_step(impl, preset, mode, args.batch_size, args.image_size, device)
        for impl, mode in variants
    }
    speeds = round_robin_throughput(steps, args.batch_size, args.steps, args.warmup, args.repeats, device)
    for (impl, mode), speed in speeds.items():
        table.add("model step", impl, preset, mode, speed)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    modes = ["eager"] + ([] if args.no_compile else args.compile_modes.split(","))
    table = Table(args.image_size, peak_flops(device))
    name = describe_device(device)
    print(
        f"device {name}, torch {torch.__version__}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
        f"bf16 autocast {device.type == 'cuda'}"
    )
    if args.data:
        speed = augmentation_throughput(args.data, args.image_size, args.batch_size, args.augment_batches, device)
        table.add("augmentation", "augment", None, "eager", speed)
    for preset in args.models.split(","):
        model_rows(table, preset, modes, args, device)
        if args.data and preset in args.component_models.split(","):
            for mode in modes:
                with tempfile.TemporaryDirectory() as scratch:
                    settings = (args.image_size, args.batch_size, args.component_epochs, mode, device, Path(scratch))
                    speed = component_throughput(args.data, preset, *settings)
                table.add("training component", "sdpa", preset, mode, speed)
    if args.output_json:
        result = {"device": name, "torch": torch.__version__, "rows": table.rows}
        args.output_json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
