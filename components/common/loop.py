"""The training loop's bookkeeping: numbers read back from the device without waiting for it,
the time each phase takes, the progress bar, the validations and the checkpoints' timing."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from components.common import checkpoints
from components.common.augment import len_epoch
from components.common.devices import mixed_precision
from components.common.distributed import ONE_PROCESS, Ranks
from components.common.metrics import correct, predict
from components.common.training import TrainingState
from model import ViT


class DeviceScalars:
    """Numbers computed on the device, read on the host without making it wait: `push` starts a
    copy to pinned memory behind an event, and `arrived` yields the values whose copies are done
    (a float, or a list for a tensor of several, with what was pushed along), a few steps later.
    Reading a loss with ``.item()`` instead would stall the host until the device caught up,
    and with it the queue of work ahead."""

    def __init__(self, device: torch.device):
        self.device, self.pending = device, collections.deque()

    def push(self, value: torch.Tensor, **along) -> None:
        if self.device.type != "cuda":
            self.pending.append((value.detach().cpu(), None, along))
            return
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value.detach(), non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.pending.append((host, copied, along))

    def arrived(self, wait: bool = False) -> Iterator[tuple[float | list[float], dict]]:
        while self.pending and (wait or self.pending[0][1] is None or self.pending[0][1].query()):
            host, copied, along = self.pending.popleft()
            if copied is not None:
                copied.synchronize()
            yield host.tolist(), along


class Stopwatch:
    """Host seconds by phase of the training loop: ``lap(phase)`` adds the time since the
    previous lap to ``phase``. On a GPU a step's time is what the host spent issuing it, which
    includes waiting whenever the device is behind."""

    def __init__(self):
        self.seconds, self.last = collections.Counter(), time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now

    def restart(self) -> None:
        self.seconds.clear()
        self.last = time.perf_counter()


def report_step(tracker, progress: tqdm, loss: float, step: int, lr: float, images_per_second: float) -> None:
    tracker.scalar("loss", "train (step)", loss, step)
    tracker.scalar("learning rate", "lr", lr, step)
    tracker.scalar("throughput", "images/s", images_per_second, step)
    progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}")


def measure_validation(
    validated: ViT, valid_images: torch.Tensor, valid_labels: torch.Tensor, epoch_sums: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """(4,) on the device, nothing read back: the validation loss of ``validated`` and its number
    of correct images, then the training loss and correct images summed over ``epoch_sums``
    (epochs, 2). `record_validation` divides them once they have arrived on the host."""
    logits = predict(validated, valid_images, valid_labels.device, batch_size, to_host=False)
    validation = torch.stack([F.cross_entropy(logits, valid_labels), correct(logits, valid_labels).sum()])
    return torch.cat([validation, epoch_sums.sum(0)])


def record_validation(
    measured: list[float],
    divisors: tuple[int, ...],
    epoch: int,
    epochs: int,
    weights: dict,
    history: dict,
    best: dict,
    tracker,
) -> str:
    """Adds the validation after ``epoch`` (from 0), `measure_validation`'s numbers over
    ``divisors``, to ``history`` and the tracker; ``weights``, the validated ones, become
    ``best`` when no earlier validation was as accurate. Returns the line to print."""
    val_loss, val_accuracy, train_loss, train_accuracy = (value / n for value, n in zip(measured, divisors))
    if val_accuracy > max(history["val_accuracy"], default=-1.0):  # written with the next checkpoint
        best.update(model=weights, epoch=epoch)
    for name, value in zip(
        ("train_loss", "train_accuracy", "val_loss", "val_accuracy"),
        (train_loss, train_accuracy, val_loss, val_accuracy),
    ):
        history[name].append(value)
        tracker.scalar(name.split("_")[1], "valid" if name.startswith("val") else "train", value, epoch + 1)
    history["epoch"].append(epoch + 1)
    return (
        f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, valid loss {val_loss:.4f}, "
        f"valid accuracy {val_accuracy:.4f}"
    )


class Loop:
    """The training loop's bookkeeping around a `TrainingState`: the step and the schedule's
    length, each epoch's summed loss and correct images (on the device, this rank's), the numbers
    on their way back to the host, the progress bar, the stopwatch, the throughput's timing and
    the checkpoint writer into ``folder``. Of a data-parallel job's ``ranks``, rank 0 alone shows
    progress and reports (``tracker`` is None on the others). ``config.time_budget`` counts
    from ``started`` (`TimeBudget`)."""

    def __init__(
        self,
        state: TrainingState,
        n_train: int,
        device: torch.device,
        tracker,
        folder: Path,
        ranks: Ranks = ONE_PROCESS,
        started: float | None = None,
    ):
        self.config, self.device, self.tracker, self.folder, self.ranks = state.config, device, tracker, folder, ranks
        config = state.config
        self.steps_per_epoch = len_epoch(n_train, config.batch_size)
        self.step = state.epoch * self.steps_per_epoch
        self.schedule(state.epochs)
        self.first_epoch = self.unreported_from = state.epoch
        self.autocast = mixed_precision(device)
        self.progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not ranks.writer,
        )
        # Loss and correct predictions summed per epoch on the device, read with the validations.
        self.epoch_sums = torch.zeros(config.epochs, 2, device=device)
        self.step_losses, self.validations = DeviceScalars(device), DeviceScalars(device)
        self.window_start, self.window_images = time.perf_counter(), 0
        self.saved_at, self.timed_from = time.monotonic(), None
        self.stopwatch = Stopwatch()
        self.writer = checkpoints.CheckpointWriter()
        # A time budget decides once; a resumed run keeps what it decided.
        budgeted = config.time_budget and not state.budget
        self.budget = TimeBudget(config.time_budget, started, self.steps_per_epoch, device, ranks) if budgeted else None

    def after_step(self, state: TrainingState, loss: torch.Tensor, lr: float, n_images: int) -> None:
        """Counts the step of ``n_images`` (the whole job's), queues its loss (the mean over the
        ranks) every ``log_every`` steps and reports what has arrived."""
        self.step += 1
        self.window_images += n_images
        if self.budget:
            self.budget.after_step()
        self.progress.update()
        if self.step % self.config.log_every == 0:
            loss = self.ranks.averaged(loss.detach())
            elapsed = time.perf_counter() - self.window_start
            if self.ranks.writer:
                self.step_losses.push(loss, step=self.step, lr=lr, images_per_second=self.window_images / elapsed)
            self.window_start, self.window_images = time.perf_counter(), 0
        self.report_losses()
        self.record_validations(state)

    def report_losses(self, wait: bool = False) -> None:
        for value, logged in self.step_losses.arrived(wait=wait):
            report_step(self.tracker, self.progress, value, **logged)

    def record_validations(self, state: TrainingState, wait: bool = False) -> None:
        for measured, along in self.validations.arrived(wait=wait):
            line = record_validation(measured, history=state.history, best=state.best, tracker=self.tracker, **along)
            self.progress.write(line)

    def save(self, state: TrainingState) -> None:
        self.writer.save({self.folder / name: payload for name, payload in state.to_checkpoint().items()})
        self.saved_at = time.monotonic()

    def schedule(self, epochs: int) -> None:
        """The learning-rate schedule is ``epochs`` long; a shorter one than ``config.epochs`` (a
        time budget's) shortens the warm-up in proportion, so that it keeps its share."""
        self.total_steps = epochs * self.steps_per_epoch
        self.warmup_steps = self.config.warmup_epochs * self.steps_per_epoch * epochs / self.config.epochs

    def fit_schedule(self, epochs: int) -> None:
        """The schedule is ``epochs`` long from now on (a time budget's decision)."""
        self.schedule(epochs)
        self.progress.total = self.total_steps
        self.progress.refresh()

    def start_timing_once(self) -> None:
        """Throughput is timed after the first epoch (compilation), from an idle GPU: the steps of
        that epoch still queued would otherwise count as timed."""
        if self.timed_from is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.timed_from = time.perf_counter()
            self.stopwatch.restart()

    def close(self, trained_to: int) -> float | None:
        """Reports the losses still on their way, waits until the last checkpoints are on disk and
        returns the images/s since the first epoch (None when there was no later one) of the
        epochs up to ``trained_to``."""
        self.report_losses(wait=True)
        self.progress.close()
        config = self.config
        timed_epochs = trained_to - self.first_epoch - 1
        throughput = (
            timed_epochs * self.steps_per_epoch * config.batch_size / (time.perf_counter() - self.timed_from)
            if (self.timed_from and timed_epochs > 0)
            else None
        )
        if throughput:
            shares = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.stopwatch.seconds.most_common())
            print(f"after the first epoch: {throughput:.0f} images/s; the loop's time went to {shares}")
        self.writer.wait()
        return throughput


class TimeBudget:
    """``--time-budget``: the run, from ``started`` (a `time.time()`), ends within ``seconds``.

    After the first epoch the schedule is fitted: as many epochs as the rest of the budget
    buys, less `FINISH_SECONDS`, at `PACE_MARGIN` times the pace, at most ``config.epochs``; the
    warm-up keeps its share of it (`Loop.schedule`), the decay ends with it. The pace is the first
    epoch's from its second quarter on (training and validation; its first steps carry one-off
    costs: allocations, on a GPU compilation), timed with the device idle. Through the first half
    of the schedule it is fitted again, at the pace of the epochs since the first, each time those
    have doubled in number (after epochs 2, 3, 5, 9, 17, ...), where that moves its end by
    `REFIT_EPOCHS` or more: a machine whose first epoch ran slow (other work starting with it, the
    clock speed drifting) would otherwise end its run minutes early, and one that slowed down
    would have its decay cut. After each later epoch the run ends where the next one, as long as
    the longest since, would end past the budget. Rank 0 decides for every rank. What was decided
    is the state's ``budget``, which checkpoints keep: a resumed run trains the schedule as last
    fitted, without a clock (its result then equals the uninterrupted run's where that fitted no
    more after the checkpoint and did not stop early)."""

    FINISH_SECONDS = 5.0  # after the last epoch: the last checkpoint, the curves, train.json, the task's closing
    # Epochs vary (checkpoints, other work on the machine): the schedule is fitted to epochs this
    # much longer than the pace, so that the budget seldom has to cut its decay short.
    PACE_MARGIN = 1.05
    REFIT_EPOCHS = 2  # a smaller change of the schedule's length is left alone: the pace's noise
    clock = staticmethod(time.time)  # what ``started`` was read from

    def __init__(
        self, seconds: float, started: float, steps_per_epoch: int, device: torch.device, ranks: Ranks = ONE_PROCESS
    ):
        self.seconds, self.started, self.device, self.ranks = seconds, started, device, ranks
        self.steps_per_epoch, self.steps, self.skipped = steps_per_epoch, 0, steps_per_epoch // 4
        self.epoch_started, self.longest_epoch = self.clock(), 0.0
        self.paced_from = self.epoch_started  # the time the pace is measured from
        self.paced_epoch = 0  # the epoch it is measured from

    def idle_clock(self) -> float:
        """The clock once the device has done what was queued (read for the fits)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return self.clock()

    def after_step(self) -> None:
        self.steps += 1
        if self.steps == self.skipped:
            self.paced_from = self.idle_clock()

    def after_epoch(self, state: TrainingState, loop: Loop) -> None:
        """Fits the schedule after the first epoch and again through its first half; ends it here
        when the next epoch would overrun."""
        budget, note = self.ranks.broadcast(self.decide(state) if self.ranks.writer else None)
        if budget != state.budget:
            state.budget = budget
            loop.fit_schedule(budget["epochs"])
            if self.ranks.writer:
                loop.progress.write(note)

    def decide(self, state: TrainingState) -> tuple[dict, str | None]:
        """The state's ``budget`` after this epoch, and a line to print when it changed."""
        since = state.epoch - self.paced_epoch  # epochs since the first fit
        fitting = not state.budget or (state.epoch <= state.budget["fitted"] // 2 and (since & (since - 1)) == 0)
        now = self.idle_clock() if fitting else self.clock()
        epoch_seconds, self.epoch_started = now - self.epoch_started, now
        left = self.seconds - (now - self.started) - self.FINISH_SECONDS
        if not state.budget:
            pace = (now - self.paced_from) * self.steps_per_epoch / (self.steps - self.skipped)  # seconds an epoch
            self.paced_from, self.paced_epoch = now, state.epoch
            fitted = self.epochs_bought(state, left, pace)
            budget = {"seconds": self.seconds, "epochs": fitted, "fitted": fitted, "stopped_early": False}
            budget.update(first_epoch_seconds=round(epoch_seconds, 2), epoch_seconds=round(pace, 2))
            return budget, (
                f"time budget {self.seconds:g} s: {now - self.started:.0f} s used, an epoch takes {pace:.1f} s "
                f"(the first {epoch_seconds:.1f} s), so the schedule is {schedule_text(fitted, state)}"
            )
        self.longest_epoch = max(self.longest_epoch, epoch_seconds)
        if fitting:
            pace = (now - self.paced_from) / since
            fitted = self.epochs_bought(state, left, pace)
            if abs(fitted - state.budget["fitted"]) >= self.REFIT_EPOCHS:
                return {**state.budget, "epochs": fitted, "fitted": fitted, "epoch_seconds": round(pace, 2)}, (
                    f"time budget {self.seconds:g} s: {now - self.started:.0f} s used, the epochs since the first "
                    f"took {pace:.1f} s each, so the schedule is now {schedule_text(fitted, state)}"
                )
        if state.epoch < state.budget["epochs"] and left < self.longest_epoch:
            return {**state.budget, "epochs": state.epoch, "stopped_early": True}, (
                f"time budget {self.seconds:g} s: stopping after epoch {state.epoch} of {state.budget['fitted']}, "
                f"as the next would end past it"
            )
        return state.budget, None

    def epochs_bought(self, state: TrainingState, left: float, pace: float) -> int:
        """The schedule's length when ``left`` seconds remain after this epoch, at ``pace`` each."""
        return min(state.config.epochs, state.epoch + max(0, int(left // (pace * self.PACE_MARGIN))))


def schedule_text(fitted: int, state: TrainingState) -> str:
    cap = f" (--epochs {fitted}, the most it may train)" if fitted == state.config.epochs else ""
    return f"{fitted} epoch{'s' * (fitted > 1)}{cap}"
