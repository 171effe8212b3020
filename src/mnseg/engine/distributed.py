"""Several processes through torchrun: the environment contract, DDP wrapping and the few collectives.

``torchrun --nproc_per_node=N -m mnseg train ...`` starts N copies of the CLI with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`init_from_env` reads
them and joins the process group only when ``WORLD_SIZE > 1``, so a plain ``mnseg train`` never
touches ``torch.distributed`` and behaves exactly as before. Every helper here is a no-op for one
process, which keeps the trainer free of ``if distributed`` branches.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from mnseg.errors import ConfigError

# Validation runs on rank 0 while the others wait at a barrier; allow long validations before timing out.
TIMEOUT = timedelta(minutes=int(os.environ.get("MNSEG_DIST_TIMEOUT_MIN", "60")))


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # this context created the process group (and so destroys it)
    # A second group for collectives inside the loss (batch Dice over processes, ``loss_sums``): its all-reduce runs
    # again in the backward pass, and on DDP's own group it could interleave with DDP's gradient buckets in another
    # order on each process.
    loss_group: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_from_env(device: torch.device) -> DistContext:
    """Context for this process; joins the process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1.

    ``device`` is the one resolved from the config; with several processes on CUDA each process takes
    ``cuda:LOCAL_RANK`` instead, as torchrun intends.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(device=device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"use --nproc_per_node <= the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist = torch.distributed
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=TIMEOUT)
        created = True
    loss_group = dist.new_group(timeout=TIMEOUT)  # collective: every process creates it here, in the same order
    return DistContext(rank, world, local_rank, device, created, loss_group)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group this context created (torchrun expects a clean exit)."""
    if ctx.initialized_here and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        ctx.initialized_here = False


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.device.type == "cuda":
            torch.distributed.barrier(device_ids=[ctx.device.index])
        else:
            torch.distributed.barrier()


@functools.cache
def _transparent_ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    class TransparentDDP(DistributedDataParallel):
        """DDP that answers attribute look-ups it lacks from the wrapped model (``spatial_dims``,
        ``use_image``, ...), so a method reading its model's settings sees the same with and without DDP."""

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("module"), name)

    return TransparentDDP


def wrap_ddp(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel around a trained model; the model itself when running as one process.

    Buffers are not broadcast at every forward: that would make a forward on rank 0 alone (validation)
    or under ``no_grad`` (pseudo-masks) a collective. With instance norm (the default) there are no
    running statistics to keep in sync; with batch norm each rank keeps its own and rank 0's are saved.
    """
    if not ctx.enabled:
        return model
    ddp_class = _transparent_ddp_class()
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Newer torch renames broadcast_buffers; both keep the broadcast of rank 0's buffers at wrap time.
    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        no_sync = {"forward_sync_buffers": False}
    else:
        no_sync = {"broadcast_buffers": False}
    return ddp_class(model, device_ids=ids, find_unused_parameters=False, **no_sync)


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    """Mean of a per-rank scalar (each rank's loss is the mean over its equally many items)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / ctx.world_size


def merge_sums(sums: dict[str, float], counts: dict[str, int], ctx: DistContext) -> dict[str, float]:
    """Global means ``sum_r sums_r[k] / sum_r counts_r[k]`` of epoch logs; keys may differ between ranks."""
    if not ctx.enabled:
        return {k: float(v) / counts[k] for k, v in sums.items()}
    gathered: list = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, ({k: float(v) for k, v in sums.items()}, dict(counts)))
    total: dict[str, float] = {}
    seen: dict[str, int] = {}
    for rank_sums, rank_counts in gathered:
        for k, v in rank_sums.items():
            total[k] = total.get(k, 0.0) + v
            seen[k] = seen.get(k, 0) + rank_counts[k]
    return {k: total[k] / seen[k] for k in total}


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` in rank order (a one-element list for one process)."""
    if not ctx.enabled:
        return [obj]
    gathered: list = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``group``; the gradient of every process's copy of the sum flows back to each
    input, so the backward is a sum over processes too. (torch.distributed.nn's version is deprecated.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM, group=ctx.group)
        return grad, None


@dataclass(frozen=True)
class SumOverRanks:
    """A loss's ``reduce_sums`` (``losses.ReduceSums``) under torchrun: the tensor summed over the processes of
    ``group``, differentiably. Its gradient is the sum of every process's gradient, so DDP's averaging then gives
    the one-process gradient. ``group`` should not be DDP's (see ``DistContext.loss_group``)."""

    group: object

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(tensor, self.group)


def loss_sums(ctx: DistContext) -> SumOverRanks | None:
    """How a batch's losses pool their sums over the processes (``Batch.reduce_sums``); None for one process."""
    if not ctx.enabled:
        return None
    return SumOverRanks(ctx.loss_group)


def check_batch_divisible(batch_size: int, ctx: DistContext) -> None:
    if ctx.enabled and batch_size % ctx.world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global batch and must be divisible by the number of "
            f"processes ({ctx.world_size}); each process trains on batch_size / {ctx.world_size} items"
        )
