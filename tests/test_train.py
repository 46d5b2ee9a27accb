"""train: the smoke preset learns on real images, reports to an offline ClearML session, and a
resumed run equals an uninterrupted one."""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

import pytest
import torch

from components.common import checkpoints
from components.common.data import resolve
from components.common.errors import CheckpointError
from components.common.loop import TimeBudget
from components.common.presets import PRESETS, preset
from components.common.training import learning_rate
from components.train import train
from tests.archives import make_layout, write_image
from tests.repository import REPO
from tests.sessions import read_session, scalars


@pytest.fixture(scope="module")
def smoke_session(smoke_run) -> dict:
    """The offline session the smoke run left, read back as a server import would."""
    return read_session(smoke_run["clearml"])


def test_the_smoke_preset_learns_the_shape_classes(smoke_run):
    losses = smoke_run["train_loss"]
    assert len(losses) == PRESETS["smoke"].epochs
    assert losses[-1] < losses[0] * 0.9
    assert max(smoke_run["val_accuracy"]) > 0.3  # 10 classes: chance is 0.1


def test_training_writes_what_it_returns_to_train_json(smoke_run):
    output = Path(smoke_run["checkpoint"]).parents[1]
    assert json.loads((output / "train.json").read_text())["train_loss"] == smoke_run["train_loss"]


def test_training_says_where_the_loops_time_went(smoke_run):
    phases = smoke_run["seconds_by_phase"]  # after the first epoch
    assert set(phases) == {"drawing the augmentation", "training steps", "validation and checkpoints"}
    assert phases["training steps"] > 0


def test_the_session_holds_each_validations_numbers(smoke_run, smoke_session):
    assert scalars(smoke_session, "loss", "train") == pytest.approx(smoke_run["train_loss"])
    assert scalars(smoke_session, "accuracy", "valid") == pytest.approx(smoke_run["val_accuracy"])


def test_the_session_holds_a_loss_and_the_throughput_every_log_every_steps(smoke_session, shapes_zip):
    n_train = resolve(str(shapes_zip)).manifest["counts"]["train"]
    steps = PRESETS["smoke"].epochs * (n_train // PRESETS["smoke"].batch_size)  # the last partial batch dropped
    step_losses = scalars(smoke_session, "loss", "train (step)")  # none lost at the end
    assert len(step_losses) == steps // PRESETS["smoke"].log_every and all(0 < loss < 5 for loss in step_losses)
    assert len(scalars(smoke_session, "throughput", "images/s")) == len(step_losses)


def test_the_session_records_the_preset_the_augmented_images_and_the_model(smoke_session):
    assert smoke_session["task"]["hyperparams"]["General"]["preset"]["value"] == "smoke"
    assert any("augmented training images" in name for name in smoke_session["files"])
    assert any(name.endswith("best.pt") for name in smoke_session["files"])  # offline, the model is an artifact


def test_the_best_checkpoint_loads_as_weights_with_its_size_and_classes(smoke_run):
    saved = checkpoints.load(smoke_run["checkpoint"])  # weights_only=True
    assert saved["config"]["image_size"] == [32, 32] and len(saved["classes"]) == 10


@pytest.mark.parametrize(("validate_every", "train_sizes"), [(1, ""), (2, "24,32,40")])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch, validate_every, train_sizes):
    # Checkpoints follow validations: with validate_every=2 the run dies after epoch 2 too.
    data = str(make_layout(tmp_path / "data", per_split=(24, 4, 4)))
    settings = dict(
        epochs=3,
        validate_every=validate_every,
        batch_size=16,
        dropout_rate=0.1,
        drop_path_rate=0.1,
        mixup_alpha=0.4,
        cutmix_alpha=0.4,
        rand_augment=2,
        random_erasing=0.5,
        ema_decay=0.9,
        checkpoint_minutes=0.0,
        train_sizes=train_sizes,
    )
    uninterrupted = train(data, "smoke", tmp_path / "full", **settings)

    real_save = checkpoints.save_atomic

    def killed_after_epoch_two(payload, path):
        real_save(payload, path)
        if Path(path).name == "last.pt" and payload["epoch"] == 1:
            raise KeyboardInterrupt  # as if the machine went down right after the checkpoint

    monkeypatch.setattr(checkpoints, "save_atomic", killed_after_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(data, "smoke", tmp_path / "resumed", **settings)
    monkeypatch.setattr(checkpoints, "save_atomic", real_save)
    assert checkpoints.load(tmp_path / "resumed" / "checkpoints" / "last.pt")["epoch"] == 1
    assert not list((tmp_path / "resumed" / "checkpoints").glob("*.tmp"))  # nothing half-written

    resumed = train(data, "smoke", tmp_path / "resumed", resume=True, **settings)
    assert resumed["epochs"] == uninterrupted["epochs"] == ([1, 2, 3] if validate_every == 1 else [2, 3])
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    assert resumed["val_accuracy"] == uninterrupted["val_accuracy"]
    full, again = checkpoints.load(uninterrupted["last_checkpoint"]), checkpoints.load(resumed["last_checkpoint"])
    for weights in ("model", "average"):
        assert all(torch.equal(full[weights][key], again[weights][key]) for key in full[weights])


def test_validations_read_back_late_keep_the_history_and_the_best_model(tmp_path, monkeypatch):
    # On a GPU a validation's numbers reach the host some steps after it ran, while training goes
    # on changing the weights; on this CPU they arrive at once. A busy GPU cannot exist here, so
    # this stand-in holds each value back for three polls of the loop, as one would.
    import components.common.loop as loop
    from components.common.data import resolve
    from components.common.images import decode_split
    from components.common.metrics import predict

    class BusyDevice(loop.DeviceScalars):
        late = 0  # values that arrived during later steps, not waited for

        def __init__(self, device):
            super().__init__(device)
            self.polls, self.ready_at = 0, collections.deque()

        def push(self, value, **along):
            super().push(value, **along)
            self.ready_at.append(self.polls + 3)

        def arrived(self, wait=False):
            self.polls += 1
            while self.pending and (wait or self.ready_at[0] <= self.polls):
                self.ready_at.popleft()
                host, _, along = self.pending.popleft()
                BusyDevice.late += not wait
                yield host.tolist(), along

    data = str(make_layout(tmp_path / "data", per_split=(32, 8, 4)))  # 12 steps an epoch at batch 8
    settings = dict(epochs=4, batch_size=8, lr=3e-3, checkpoint_minutes=60.0)  # one checkpoint, at the end
    at_once = train(data, "smoke", tmp_path / "at-once", **settings)
    monkeypatch.setattr(loop, "DeviceScalars", BusyDevice)
    late = train(data, "smoke", tmp_path / "late", **settings)

    assert BusyDevice.late >= 3  # the first three validations were read while the next epoch trained
    for key in ("epochs", "train_loss", "val_loss", "val_accuracy"):
        assert late[key] == at_once[key]
    assert scalars(read_session(late["clearml"]), "accuracy", "valid") == pytest.approx(late["val_accuracy"])
    # All 3 classes right from the first validation on, so no later one is more accurate: best.pt
    # must hold the weights of epoch 1, which training had long changed when the result arrived.
    assert late["val_accuracy"] == [1.0] * 4 and late["val_loss"][0] > 2 * late["val_loss"][-1]
    model, best = checkpoints.load_model(late["checkpoint"])
    assert best["epoch"] == 0
    images, labels = decode_split(resolve(data), "valid", 32)
    loss = torch.nn.functional.cross_entropy(predict(model, images, torch.device("cpu")), torch.from_numpy(labels))
    assert loss.item() == pytest.approx(late["val_loss"][0], rel=1e-5)


def test_checkpoints_are_written_in_the_background_as_they_were_when_saved(tmp_path):
    weights, history = {"w": torch.zeros(1000)}, [1.0]
    writer = checkpoints.CheckpointWriter()
    writer.save({tmp_path / "checkpoints" / "last.pt": {"model": weights, "config": {}, "history": history}})
    weights["w"] += 1  # training goes on while the file is written
    history.append(2.0)
    writer.wait()
    saved = checkpoints.load(tmp_path / "checkpoints" / "last.pt")
    assert torch.equal(saved["model"]["w"], torch.zeros(1000)) and saved["history"] == [1.0]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_a_failed_checkpoint_write_is_raised_where_the_training_waits(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    writer = checkpoints.CheckpointWriter()
    writer.save({tmp_path / "not-a-folder" / "last.pt": {"model": {}, "config": {}}})
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # raised once; the next checkpoint may still be written


def test_the_weight_average_is_validated_and_kept_as_the_best_model(tmp_path):
    from components.common.training import update_average

    model, average = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    start = average.weight.detach().clone()
    update_average(average, model, decay=0.99, step=0)  # warm-up: d = 1/10
    assert torch.allclose(average.weight, 0.1 * start + 0.9 * model.weight)
    before = average.weight.detach().clone()
    update_average(average, model, decay=0.5, step=1000)  # d = decay once warmed up
    assert torch.allclose(average.weight, 0.5 * before + 0.5 * model.weight)

    data = str(make_layout(tmp_path / "data", per_split=(24, 4, 4)))
    result = train(data, "smoke", tmp_path / "run", epochs=1, batch_size=8, ema_decay=0.9)
    last, best = checkpoints.load(result["last_checkpoint"]), checkpoints.load(result["checkpoint"])
    assert all(torch.equal(best["model"][key], last["average"][key]) for key in best["model"])
    assert not all(torch.equal(last["model"][key], last["average"][key]) for key in last["model"])


def test_resume_with_other_settings_is_refused(tmp_path):
    data = str(make_layout(tmp_path / "data", per_split=(8, 2, 2)))
    train(data, "smoke", tmp_path / "run", epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="trained with other settings"):
        train(data, "smoke", tmp_path / "run", resume=True, epochs=1, batch_size=4)


@pytest.mark.parametrize("other", ["a class more", "other images of the same classes"])
def test_resume_onto_other_data_is_refused_before_last_pt_is_touched(tmp_path, other):
    from components.common.errors import DataError

    data = str(make_layout(tmp_path / "data", per_split=(8, 2, 2)))
    train(data, "smoke", tmp_path / "run", epochs=1, batch_size=8)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    if other == "a class more":
        other_data = make_layout(tmp_path / "other", per_split=(8, 2, 2), csv_name=None)
        for split_index, (split, count) in enumerate((("train", 8), ("valid", 2), ("test", 2))):
            for i in range(count):
                write_image(other_data / split / "TOP HAT" / f"{i}.jpg", seed=5000 + 10 * i + split_index)
    else:
        other_data = make_layout(tmp_path / "other", per_split=(9, 2, 2))
    with pytest.raises(
        DataError, match=r"--resume: .*last.pt was trained on data version \w+ .*train into a new --output"
    ):
        train(str(other_data), "smoke", tmp_path / "run", resume=True, epochs=1, batch_size=8)
    assert last.read_bytes() == before


def test_a_damaged_or_foreign_checkpoint_says_what_is_wrong(tmp_path):
    good = tmp_path / "good.pt"
    checkpoints.save_atomic({"model": {"w": torch.zeros(4000)}, "config": {}}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:3000])
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"model": {}, "config": Path("x")}, tmp_path / "objects.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    expected = {
        "cut.pt": "is not a readable checkpoint .*pass a .pt file that train wrote",
        "notes.pt": "is not a readable checkpoint",
        "objects.pt": "holds objects other than weights",
        "other.pt": "is not a checkpoint of this project",
        "missing.pt": "no checkpoint at",
    }
    for name, message in expected.items():
        with pytest.raises(CheckpointError, match=message):
            checkpoints.load(tmp_path / name)
    assert checkpoints.load(good)["model"]["w"].shape == (4000,)
    with pytest.raises(CheckpointError, match="good.pt: its weights do not fit the model"):
        checkpoints.load_model(good)


def test_a_failed_write_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    import resource
    import signal

    path = tmp_path / "last.pt"
    checkpoints.save_atomic({"model": {"w": torch.zeros(10)}, "config": {}}, path)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))  # a disk that takes no larger file
    try:
        with pytest.raises(OSError, match=rf"could not write {path}: File too large"):
            checkpoints.save_atomic({"model": {"w": torch.zeros(100_000)}, "config": {}}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert checkpoints.load(path)["model"]["w"].shape == (10,)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_the_schedule_warms_up_then_decays_to_min_lr():
    config = preset("smoke", lr=1e-3, min_lr=1e-5)
    rates = [learning_rate(config, step, total_steps=100, warmup_steps=20) for step in range(100)]
    assert rates[0] == pytest.approx(1e-3 / 20) and rates[19] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[19:], rates[20:]))
    assert rates[-1] == pytest.approx(1e-5, abs=1e-6)


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match=r"unknown training settings \['learning_rate'\]"):
        preset("smoke", learning_rate=1.0)
    with pytest.raises(ValueError, match=r"--crop-scale must be in \(0, 1\].*got 0"):
        preset("smoke", crop_scale=0)


def test_each_step_trains_at_a_size_drawn_from_train_sizes_and_the_model_keeps_its_own(tmp_path, monkeypatch, capsys):
    import components.train as training

    shapes = []

    def recording(*args, **kwargs):
        inputs = batch_inputs(*args, **kwargs)
        shapes.append(tuple(inputs[0].shape[-2:]))
        return inputs

    batch_inputs = training.batch_inputs
    monkeypatch.setattr(training, "batch_inputs", recording)
    data = str(make_layout(tmp_path / "data", per_split=(16, 2, 2)))  # 3 classes: 48 training images
    result = train(data, "smoke", tmp_path / "run", epochs=2, batch_size=4, train_sizes="16,24,48")
    assert len(shapes) == 2 * 48 // 4 and set(shapes) == {(16, 16), (24, 24), (48, 48)}
    assert "note: training at 16,24,48 for a model of size 32; --train-sizes 32" in capsys.readouterr().out
    saved = checkpoints.load(result["checkpoint"])
    assert saved["config"]["image_size"] == [32, 32] and saved["model"]["projector.pos_embed"].shape[1] == 1 + 4 * 4


@pytest.mark.parametrize(
    ("train_sizes", "message"),
    [
        ("160;224", r"--train-sizes '160;224': give image sizes separated by commas, e.g. 16,32,40"),
        ("32,36,0", r"--train-sizes '32,36,0': 36, 0 is not a positive multiple of the patch size 8; e.g. 16,32,40"),
    ],
)
def test_wrong_train_sizes_are_refused_before_any_work(tmp_path, train_sizes, message):
    with pytest.raises(ValueError, match=message):
        train(str(tmp_path / "not-read.zip"), "smoke", tmp_path / "run", train_sizes=train_sizes)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            dict(stem="conv", patch_size=6),
            "--stem conv: the convolutional tokenizer .* power-of-2 patch size from 2 on, not 6",
        ),
        (dict(stem="cnn"), "--stem cnn: unknown stem 'cnn'; choose one of linear, conv"),
    ],
)
def test_a_stem_that_cannot_make_the_tokens_is_refused_before_any_work(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        train(str(tmp_path / "not-read.zip"), "smoke", tmp_path / "run", **settings)
    assert not (tmp_path / "run").exists()


def test_an_unknown_compile_mode_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--compile 'on': choose auto or one of off, default, reduce-overhead"):
        train(str(tmp_path / "not-read.zip"), "smoke", tmp_path / "run", compile="on")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_terminated_run_stops_promptly_and_resumes_from_its_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from components.common.tracking import child_environment

    data = str(make_layout(tmp_path / "data", per_split=(64, 4, 4)))
    command = [
        sys.executable,
        "-m",
        "components.train",
        "--data",
        data,
        "--preset",
        "smoke",
        "--output",
        str(tmp_path / "run"),
        "--epochs",
        "60",
        "--batch-size",
        "16",
        "--checkpoint-minutes",
        "0",
    ]
    run = subprocess.Popen(
        command, cwd=REPO, env=child_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)  # what kill, timeout and an agent's abort send
    stopped = time.monotonic()
    run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM
    assert time.monotonic() - stopped < 20
    assert (tmp_path / "run" / "train.clearml-offline.zip").is_file()  # the session was closed and kept
    assert not list((tmp_path / "run").rglob("*.tmp"))
    epoch = checkpoints.load(last)["epoch"]

    resumed = train(data, "smoke", tmp_path / "run", resume=True, epochs=60, batch_size=16, checkpoint_minutes=0.0)
    assert len(resumed["train_loss"]) == 60 and epoch < 59


class EpochClock:
    """A wall clock for `TimeBudget` that the test runs: its first reading is the loop's start,
    ``setup`` seconds after the run's, each later one the next of ``intervals`` after the one
    before (with fewer than 4 steps an epoch it is read at the end of each epoch; with more,
    once more after the first quarter of the first epoch)."""

    def __init__(self, setup: float, intervals: list[float]):
        self.readings = itertools.accumulate([setup, *intervals])

    def __call__(self) -> float:
        return next(self.readings)


def budgeted_run(
    tmp_path, monkeypatch, epoch_seconds: list[float], name: str = "run", per_class: int = 8, **settings
) -> dict:
    """A smoke run with a time budget of 100 s (at most 20 epochs) on the test's clock, which
    says the run's setup took 5 s and each epoch what ``epoch_seconds`` says; ``per_class``
    training images of each of 3 classes, in steps of 16 (8: one step an epoch)."""
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(EpochClock(5, epoch_seconds)))
    data = str(make_layout(tmp_path / "data", per_split=(per_class, 4, 4)))
    settings = {"epochs": 20, "time_budget": 100, "batch_size": 16, "checkpoint_minutes": 0.0, **settings}
    return train(data, "smoke", tmp_path / name, started=0.0, **settings)


@pytest.mark.slow
def test_a_time_budget_fits_the_schedule_to_the_epochs_it_buys(tmp_path, monkeypatch, capsys):
    import components.train as training

    totals, warmups = [], []

    def learning_rate_of(config, step, total_steps, warmup_steps):
        totals.append(total_steps)
        warmups.append(warmup_steps)
        return learning_rate(config, step, total_steps, warmup_steps)

    monkeypatch.setattr(training, "learning_rate", learning_rate_of)
    # 15 s used after the first epoch of 10 s: 100 - 15 - 5 (to finish) left, which buys 7 more
    # epochs of 10.5 s (the pace with its margin of 5%).
    result = budgeted_run(tmp_path, monkeypatch, [10] * 20)
    fitted = {"seconds": 100, "epochs": 8, "fitted": 8, "stopped_early": False}
    fitted.update(first_epoch_seconds=10.0, epoch_seconds=10.0)
    assert result["time_budget"] == fitted
    assert result["epochs"] == list(range(1, 9))
    steps_per_epoch = len(totals) // 8
    assert set(totals[steps_per_epoch:]) == {8 * steps_per_epoch}  # the decay ends with epoch 8
    assert set(warmups[steps_per_epoch:]) == {0.5 * steps_per_epoch * 8 / 20}  # smoke's warm-up keeps its share
    assert "time budget 100 s: 15 s used, an epoch takes 10.0 s (the first 10.0 s), so the schedule is 8 epochs" in (
        capsys.readouterr().out
    )
    assert json.loads((tmp_path / "run" / "train.json").read_text())["time_budget"] == fitted


@pytest.mark.slow
def test_a_time_budget_paces_epochs_without_the_first_steps_one_off_costs(tmp_path, monkeypatch, capsys):
    # 4 steps an epoch: the pace leaves out the first (4 s of the first epoch's 10): 6 s for the
    # other 3, 8 s an epoch; 100 - 15 - 5 s then buy 9 more epochs of 8.4 s (with the margin),
    # where the first epoch's 10 s would buy 7.
    result = budgeted_run(tmp_path, monkeypatch, [4, 6] + [8] * 20, per_class=22)  # 66 images, 4 steps
    assert result["time_budget"]["epochs"] == 10
    assert result["time_budget"]["first_epoch_seconds"] == 10.0 and result["time_budget"]["epoch_seconds"] == 8.0
    assert "an epoch takes 8.0 s (the first 10.0 s), so the schedule is 10 epochs" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("epoch_seconds", "budget", "said"),
    [
        # The first epoch takes 20 s (other work starting with it): 100 - 25 - 5 s left buy 3 more
        # of 21 s (with the margin). The second takes 10 s: the 60 s left then buy 5 more, so the
        # schedule is fitted again, to 7 epochs, and the run ends at 95 s instead of 65 s.
        (
            [20] + [10] * 19,
            dict(epochs=7, fitted=7, stopped_early=False, first_epoch_seconds=20.0, epoch_seconds=10.0),
            "35 s used, the epochs since the first took 10.0 s each, so the schedule is now 7 epochs",
        ),
        # Fitted to 8 epochs of 10 s; the third takes 20 s: 50 s left buy 3 more at the 15 s that
        # the second and third took, so the decay now ends with epoch 6, which the budget then
        # leaves out as the next would end past it: 1 epoch of the decay cut instead of 3.
        (
            [10, 10] + [20] * 18,
            dict(epochs=5, fitted=6, stopped_early=True, first_epoch_seconds=10.0, epoch_seconds=15.0),
            "45 s used, the epochs since the first took 15.0 s each, so the schedule is now 6 epochs",
        ),
    ],
    ids=["faster-after-the-first-epoch", "slower-in-the-first-half"],
)
def test_through_its_first_half_a_budget_fits_the_schedule_again_at_the_later_epochs_pace(
    tmp_path, monkeypatch, capsys, epoch_seconds, budget, said
):
    import components.train as training

    totals = []

    def learning_rate_of(config, step, total_steps, warmup_steps):
        totals.append(total_steps)
        return learning_rate(config, step, total_steps, warmup_steps)

    monkeypatch.setattr(training, "learning_rate", learning_rate_of)
    result = budgeted_run(tmp_path, monkeypatch, epoch_seconds)  # one step an epoch
    assert result["time_budget"] == {"seconds": 100, **budget}
    assert result["epochs"] == list(range(1, budget["epochs"] + 1))
    assert totals[-1] == budget["fitted"]  # the decay ends with the schedule as last fitted
    assert f"time budget 100 s: {said}" in capsys.readouterr().out


def test_a_time_budget_never_buys_more_than_the_epochs_setting(tmp_path, monkeypatch, capsys):
    result = budgeted_run(tmp_path, monkeypatch, [1] * 20, epochs=6)
    assert result["time_budget"]["epochs"] == 6 and result["epochs"] == list(range(1, 7))
    assert "so the schedule is 6 epochs (--epochs 6, the most it may train)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_that_falls_behind_stops_at_its_budget_with_the_epoch_validated_and_saved(tmp_path, monkeypatch, capsys):
    # Fitted to 8 epochs of 10 s; from the fifth on they take 20 s: after the sixth (85 s used)
    # the next would end past 100 - 5 s, so the sixth is the last, validated though
    # validate_every is 4, and checkpointed.
    result = budgeted_run(tmp_path, monkeypatch, [10, 10, 10, 10, 20, 20, 20, 20, 20], validate_every=4)
    assert result["time_budget"] == {
        "seconds": 100,
        "epochs": 6,
        "fitted": 8,
        "stopped_early": True,
        "first_epoch_seconds": 10.0,
        "epoch_seconds": 10.0,
    }
    assert result["epochs"] == [4, 6]
    last = checkpoints.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 5 and last["budget"] == result["time_budget"]
    assert "time budget 100 s: stopping after epoch 6 of 8, as the next would end past it" in capsys.readouterr().out


@pytest.mark.slow
def test_a_budgeted_run_resumes_its_fitted_schedule_exactly(tmp_path, monkeypatch):
    uninterrupted = budgeted_run(tmp_path, monkeypatch, [10] * 20, name="full")
    real_save = checkpoints.save_atomic

    def killed_after_epoch_three(payload, path):
        real_save(payload, path)
        if Path(path).name == "last.pt" and payload["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_atomic", killed_after_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        budgeted_run(tmp_path, monkeypatch, [10] * 20, name="resumed")
    monkeypatch.setattr(checkpoints, "save_atomic", real_save)

    def no_clock():
        raise AssertionError("a resumed run trains the schedule its budget fitted, without asking the clock")

    monkeypatch.setattr(TimeBudget, "clock", staticmethod(no_clock))
    data = str(tmp_path / "data")
    resumed = train(data, "smoke", tmp_path / "resumed", resume=True, epochs=20, time_budget=100, batch_size=16,
                    checkpoint_minutes=0.0)  # fmt: skip
    assert resumed["time_budget"] == uninterrupted["time_budget"]
    assert resumed["epochs"] == uninterrupted["epochs"] == list(range(1, 9))
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    full, again = checkpoints.load(uninterrupted["last_checkpoint"]), checkpoints.load(resumed["last_checkpoint"])
    assert all(torch.equal(full["model"][key], again["model"][key]) for key in full["model"])


def test_the_readme_lists_every_training_flag():
    from dataclasses import fields

    from components.common.presets import TrainConfig

    readme = (REPO / "README.md").read_text()
    missing = [f.name for f in fields(TrainConfig) if f"`--{f.name.replace('_', '-')}`" not in readme]
    assert not missing, f"README.md does not list {missing}"
