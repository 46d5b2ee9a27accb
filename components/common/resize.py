"""Moving a trained model to another image size, beyond interpolating its position embeddings
(`model.ViT.set_image_size`): a short fine-tune at the new size, and the numbers chosen on the
validation split there (the attention scale; the share of a fine-tune's change kept)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from components.common.augment import augment, endless_batches
from components.common.devices import mixed_precision
from components.common.metrics import split_metrics
from components.common.presets import FinetuneConfig
from components.common.training import learning_rate, optimization_step
from model import ViT


def finetune(model: ViT, images: np.ndarray, labels: np.ndarray, config: FinetuneConfig, device: torch.device):
    """``config.steps`` steps of SGD with momentum 0.9 on ``images`` (uint8 (N, S, S, 3), at the
    model's size), cosine decay from ``config.lr``, gradient clipping, ``config``'s crop and
    flip; returns the loss of every step."""
    torch.manual_seed(config.seed)  # drop path and dropout draw the same whatever ran before
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    config = replace(config, batch_size=min(config.batch_size, len(images)))
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    batches, autocast = endless_batches(len(images), config, device), mixed_precision(device)
    losses = []
    for step, batch in zip(tqdm(range(config.steps), desc="fine-tune", unit="step"), batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, config.steps, warmup_steps=0)
        targets = F.one_hot(labels.index_select(0, batch.index), model.config["n_classes"]).float()
        loss, _ = optimization_step(model, model, optimizer, augment(images, batch), targets, config, autocast)
        losses.append(loss.detach())
    return torch.stack(losses).tolist()  # read once: no synchronisation per step


def lowest_loss(
    set_factor: Callable[[float], ViT], factors, images: np.ndarray, labels: np.ndarray, device: torch.device
) -> pd.DataFrame:
    """Evaluates the model ``set_factor(factor)`` returns for each factor on ``images`` (the
    validation split), leaves it set to the factor with the lowest loss, and returns every
    factor's loss and accuracy."""
    curve = pd.DataFrame(
        {"factor": float(factor), **split_metrics(set_factor(float(factor)), images, labels, device)}
        for factor in factors
    )
    set_factor(chosen(curve))
    return curve


def chosen(curve: pd.DataFrame) -> float:
    """The factor of a `lowest_loss` curve that it left set."""
    return float(curve["factor"][curve["loss"].idxmin()])


def calibrate_attention(
    model: ViT, images: np.ndarray, labels: np.ndarray, device: torch.device, trained_tokens: int, steps: int = 10
) -> pd.DataFrame:
    """Sets the model's attention scale to the factor with the lowest loss on ``images``
    (the validation split) among 1 to 2 in ``steps`` geometric steps (1 to 1/2 if the model
    now has fewer tokens than ``trained_tokens``); returns every factor's loss and accuracy."""
    tokens = 1 + model.projector.grid[0] * model.projector.grid[1]
    direction = 1 if tokens >= trained_tokens else -1
    return lowest_loss(
        model.set_attention_scale, 2.0 ** (direction * np.linspace(0, 1, steps + 1)), images, labels, device
    )


def interpolate_finetune(
    model: ViT, before: dict[str, torch.Tensor], images: np.ndarray, labels: np.ndarray, device: torch.device, steps=4
) -> pd.DataFrame:
    """WiSE-FT: sets the fine-tuned ``model``'s weights to ``before + share * (fine-tuned -
    before)``, with the share of the fine-tune's change kept (0 to 1 in ``steps`` steps) that
    gives the lowest loss on ``images`` (the validation split); returns every share's loss and
    accuracy."""
    after = {name: weight.detach().clone() for name, weight in model.state_dict().items()}

    def keep(share: float) -> ViT:
        model.load_state_dict({name: torch.lerp(before[name], after[name], share) for name in after})
        return model

    return lowest_loss(keep, np.linspace(0, 1, steps + 1), images, labels, device)
