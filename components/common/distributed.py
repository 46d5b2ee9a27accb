"""Data-parallel training over ranks, on torch.distributed: one process per device (a GPU, or on
a CPU a share of its cores), the model wrapped in DistributedDataParallel, gradients averaged
by NCCL on GPUs and gloo on CPUs.

A rank learns its place from the environment that ``torchrun`` (or `launch`, which starts ranks
the same way from inside a process) gives it: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address. Without them there is one rank and nothing here does anything. Rank 0 is
the one writer: it alone holds the run folder, writes checkpoints and results and reports to
ClearML; the others compute their share of every batch and keep quiet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from components.common.cli import one_line
from components.common.devices import pick_device
from components.common.errors import INPUT_ERRORS, ConfigError, TrainingError

# A collective waits this long for a rank that stopped answering without dying (a hung device);
# a rank that dies is noticed within a second by the launcher, which stops the others.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class Ranks(NamedTuple):
    """This process's place in the job: its rank among ``world_size``, and on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        """``train``'s name in messages: with the rank when there are several."""
        return "train" if self.world_size == 1 else f"train (rank {self.rank} of {self.world_size})"

    def averaged(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks (every rank must call it at the same point)."""
        return self.summed(tensor) / self.world_size if self.world_size > 1 else tensor

    def summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (every rank must call it at the same point)."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def writer_first(self) -> Iterator[None]:
        """The block runs on rank 0 first, then on the others: for what fills a shared cache
        (extracting the data, downloading weights), which they then find filled."""
        if not self.writer:
            self.barrier()
        yield
        if self.writer:
            self.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if self.world_size == 1:
            return value
        carried = [value]
        dist.broadcast_object_list(carried, src=0)
        return carried[0]


ONE_PROCESS = Ranks()


def parallel(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """``model`` as the training step calls it: itself for one rank, else wrapped in
    DistributedDataParallel, which averages the gradients over the ranks during the backward."""
    if ranks.world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def from_environment() -> Ranks:
    """The ranks ``torchrun`` describes in the environment; one rank without it."""
    return Ranks(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def check_batch(batch_size: int, world_size: int) -> None:
    """--batch-size is the global batch: every rank must take an equal share of it."""
    if batch_size % world_size:
        below = batch_size // world_size * world_size
        raise ConfigError(
            f"--batch-size {batch_size} is the global batch and {world_size} ranks cannot share it equally; "
            f"pass a multiple of {world_size}, e.g. {below or world_size} or {below + world_size}"
        )


def check_launch(batch_size: int, ranks_per_node: int, node: dict | None) -> None:
    """What `launch` would start is refused here, in one line, rather than once by every rank."""
    if from_environment().world_size > 1:
        raise ConfigError("--ranks under torchrun: torchrun has started the ranks already; leave --ranks out")
    check_batch(batch_size, ranks_per_node * (int(node["total_num_nodes"]) if node else 1))


@contextlib.contextmanager
def joined(device_name: str = "auto") -> Iterator[tuple[Ranks, torch.device]]:
    """This process's ranks and device for the block, its process group joined when there are
    several: ``auto`` or ``cuda`` gives each rank the GPU of its local rank (NCCL), ``cpu`` or
    no GPU a process on the CPU (gloo). Ranks other than 0 print nothing to stdout."""
    ranks = from_environment()
    if ranks.world_size == 1:
        yield ranks, pick_device(device_name)
        return
    if device_name not in ("auto", "cuda", "cpu"):
        raise ConfigError(
            f"--device {device_name}: with {ranks.world_size} ranks each takes the GPU of its local rank; "
            f"pass --device auto, cuda or cpu (CUDA_VISIBLE_DEVICES chooses the GPUs)"
        )
    on_gpu = device_name != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", ranks.local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:  # the ranks share the machine's cores, a thread each by default, as torchrun sets
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    dist.init_process_group(
        "nccl" if on_gpu else "gloo", timeout=COLLECTIVE_TIMEOUT, device_id=device if on_gpu else None
    )
    try:
        with contextlib.redirect_stdout(sys.stdout if ranks.writer else open(os.devnull, "w")):  # noqa: SIM115
            yield ranks, device
    finally:
        dist.destroy_process_group()


def launch(function: Callable, kwargs: dict, ranks_per_node: int, node: dict | None = None):
    """Runs ``function(**kwargs)`` in ``ranks_per_node`` new processes of this machine, as
    ``torchrun --nproc_per_node`` would, and returns what rank 0 returned (None on a machine
    without it). ``node`` joins them to ranks on other machines: ``{"total_num_nodes",
    "node_rank", "master_addr", "master_port"}``, as ClearML's `Task.launch_multi_node` returns
    it. A rank that fails stops the others within a second; its rank and its error or signal
    are then raised in one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nodes = int(node["total_num_nodes"]) if node else 1
    rendezvous = (
        {"rdzv_backend": "static", "rdzv_configs": {"rank": int(node["node_rank"])}}
        if node
        else {"rdzv_backend": "c10d", "rdzv_configs": {}}
    )
    config = LaunchConfig(
        min_nodes=nodes,
        max_nodes=nodes,
        nproc_per_node=ranks_per_node,
        run_id=str(uuid.uuid4()),
        rdzv_endpoint=f"{node['master_addr']}:{node['master_port']}" if node else "localhost:0",
        max_restarts=0,  # a failed job is resumed with --resume, from its last checkpoint
        **rendezvous,
    )
    for chatty in ("torch.distributed.elastic", "torch.multiprocessing"):  # the line below says it in one
        logging.getLogger(chatty).setLevel(logging.CRITICAL)
    try:
        returned = elastic_launch(config, _call)(function, kwargs)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        raise TrainingError(
            f"rank {rank} of {nodes * ranks_per_node} failed ({failure_reason(failure)}), so the job stopped; "
            f"fix that and run again, or --resume from the last checkpoint"
        ) from None
    return returned.get(0) if returned else None


def _call(function: Callable, kwargs: dict):
    """A rank's entry point (the launcher passes arguments by position only). The project's own
    errors reach the launcher through the error file it reads, without a traceback; a bug keeps
    its traceback."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    try:
        return function(**kwargs)
    except INPUT_ERRORS as error:
        get_error_handler().record_exception(error)
        sys.exit(2)


def failure_reason(failure) -> str:
    """A failed rank's error in a few words: its exception's message, or the signal that ended it."""
    if failure.exitcode < 0:
        return f"ended by {failure.signal_name()}"
    message = failure.message  # from the error file the launcher's wrapper writes for an exception
    if isinstance(message, dict):
        message = message.get("message", "")
    if failure.error_file == "<N/A>" or not str(message).strip():
        return f"exit status {failure.exitcode}; its error is printed above"
    kind, _, text = str(message).partition(": ")
    return one_line(text if kind in {error.__name__ for error in INPUT_ERRORS} else str(message))


def machines(total: int) -> dict:
    """This machine's place among ``total`` running the pipeline's train step, through ClearML's
    multi-node launch: the step's task on the first clones itself ``total`` - 1 times onto its
    queue, and every copy learns the first one's address (`launch`'s ``node``)."""
    from clearml import Task

    task = Task.current_task()
    if task is None or task.running_locally():
        raise ConfigError(f"--nodes {total}: training on several machines needs ClearML agents; run in server mode")
    return task.launch_multi_node(total, wait=True)


def ranks_per_machine(device_name: str) -> int:
    """What the train step starts on its machine: a rank per visible GPU, one on a CPU."""
    gpus = torch.cuda.device_count() if device_name in ("auto", "cuda") else 0
    return max(1, gpus)
