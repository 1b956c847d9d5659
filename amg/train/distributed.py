"""One training run over several processes started by torchrun (DistributedDataParallel).

Without torchrun's environment nothing here starts a process group, and training is the
single-process one, unchanged. Under `torchrun --nproc_per_node W` every process builds the
same global PK batch, trains on its share of the identities (`amg.data.sampler.rank_share`),
and the losses are computed over the global batch (`gather_rows`, the neck hook of
`data_parallel`), so the run follows the single-process one with the same global batch.
Backend: NCCL when every local process has its own GPU (training then runs there), else gloo
on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from amg.model.vit import ReIDViT

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")  # with MASTER_ADDR and MASTER_PORT


@dataclass(frozen=True)
class World:
    """This process's rank among `size` training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None  # "gloo" or "nccl" in a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return World()


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return world().is_main


def join() -> World:
    """Join torchrun's process group (once; nothing without torchrun); this process's World."""
    if launched_by_torchrun() and not dist.is_initialized():
        if _gpu_per_process():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return world()


def _gpu_per_process() -> bool:
    # Two processes on one GPU would fail in NCCL: with fewer GPUs than processes, gloo on the CPU.
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    return torch.cuda.is_available() and torch.cuda.device_count() >= local_processes


@contextlib.contextmanager
def session() -> Iterator[World]:
    """A command run as one of torchrun's processes: only rank 0's output shows (the others'
    errors still do, after the block), and at a clean end the processes wait for each other,
    so none leaves while rank 0 still writes what the others' callers may read."""
    joined_here = launched_by_torchrun() and not dist.is_initialized()
    current = join()
    try:
        with _silenced(not current.is_main):
            yield current
        if joined_here:
            dist.barrier()
    finally:  # after an error, no barrier: the other processes may never reach it
        if joined_here:
            dist.destroy_process_group()


@contextlib.contextmanager
def _silenced(silent: bool) -> Iterator[None]:
    if not silent:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others, which then find what it wrote (a generated data set)."""
    current = world()
    if not current.is_main:
        dist.barrier()
    yield
    if current.is_main and current.size > 1:
        dist.barrier()


def from_main(value):
    """Rank 0's `value` on every process (`value` itself without a process group). For decisions the
    processes must share, such as a pruning plan: scores from gradients can differ in their last
    bits between GPUs, a near-tie then flips, and processes holding models of other shapes cannot
    train together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def training_device() -> torch.device | None:
    """This process's GPU under NCCL; None (wherever the model is) otherwise."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The processes' tensors (the same shape on each) concatenated in rank order: the global
    batch; the tensor itself in a single process. Differentiable: each process's own rows get
    the gradient summed over the processes, which DDP's averaging makes the global-batch one."""
    if not dist.is_initialized():
        return tensor
    return _GatherRows.apply(tensor)


class _GatherRows(torch.autograd.Function):
    # torch.distributed.nn.functional.all_gather does this too, but is deprecated for a private API.
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = slice(dist.get_rank() * len(tensor), (dist.get_rank() + 1) * len(tensor))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


@contextlib.contextmanager
def data_parallel(model: ReIDViT, teacher: ReIDViT | None = None) -> Iterator[torch.nn.Module]:
    """`model` as it trains in the process group: DistributedDataParallel on this process's
    device, its neck (BatchNorm) and classifier fed the global batch, so batch statistics and
    the ID loss are the single-process ones. Without a process group, `model` itself.
    On exit the model (and `teacher`) are back on their device and the neck hook is gone."""
    if not dist.is_initialized():
        yield model
        return
    device = training_device()
    home = next(model.parameters()).device
    modules = [module for module in (model, teacher) if module is not None]
    hook = model.neck.register_forward_pre_hook(lambda _, inputs: (gather_rows(inputs[0]),))
    try:
        for module in modules:
            module.to(device or home)
        # static_graph: a pruned model's emptied blocks leave parameters unused, the same ones every step
        yield DistributedDataParallel(model, device_ids=[device.index] if device else None, static_graph=True)
    finally:
        hook.remove()
        for module in modules:
            module.to(home)
