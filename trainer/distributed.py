"""Data-parallel training over processes started by ``torchrun``: FSDP2 shards, rank 0 rolls out.

    torchrun --nproc_per_node 8 -m trainer.cli --config configs/r1-distill-qwen-1.5b-ar-linear.yaml

Every rank holds a shard of the policy (``torch.distributed.fsdp.fully_shard`` on each decoder
layer, then on the tree forward as the root). Rank 0 runs the rollout engine (the embedded engine,
or the client of the SGLang servers), scores the rollouts and computes the advantages (they need
whole prompt groups), then broadcasts the ``TrainBatch``; each mini-batch's trees are split
across ranks by token count. Loss weights are computed over the whole mini-batch, so the ranks'
gradients add up to the one-process gradient. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: ``rank`` of ``world_size`` (1: no process group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = Distributed()


def setup_distributed(device: torch.device, timeout_minutes: float = 180.0) -> Distributed:
    """Join the process group ``torchrun`` describes in the environment (none for one process).

    ``timeout_minutes`` bounds every collective: ranks > 0 wait in one while rank 0 rolls out,
    grades and evaluates, which at b_max 8000 takes far longer than NCCL's 10-minute default.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        if timeout_minutes <= 0:
            raise ValueError(f"the collective timeout must be > 0 minutes, got {timeout_minutes}")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return Distributed(dist.get_rank(), dist.get_world_size())


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_device(device: torch.device) -> torch.device:
    """This rank's device: its own GPU under torchrun, else ``device``."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def fsdp_param_dtype(setting: str, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """``train.fsdp_param_dtype`` as the dtype for ``shard_policy``: ``auto`` gathers in the autocast
    dtype when there is one (the matmuls run in it anyway), ``float32`` keeps the weights' own dtype."""
    if setting == "auto":
        return autocast_dtype
    if setting == "float32":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    raise ValueError(f"train.fsdp_param_dtype must be auto, float32 or bfloat16, got {setting!r}")


def shard_policy(policy, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: every decoder layer is a unit, the tree forward (embeddings, final norm, LM head) the root.

    ``param_dtype`` (e.g. ``torch.bfloat16``): the units gather their parameters in this dtype and
    compute with them (half the all-gather traffic and unsharded memory of fp32 weights), and the
    gradients are reduced in fp32 into the fp32 shards the optimizer updates (FSDP2's
    ``MixedPrecisionPolicy``). None: the parameters' own dtype throughout. Forward inputs are not
    cast: autocast decides each op's dtype, as in one process.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy_kwargs = {}
    if param_dtype is not None:
        policy_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for layer in policy.decoder.layers:
        fully_shard(layer, **policy_kwargs)
    fully_shard(policy.module, **policy_kwargs)


def broadcast(value, context: Distributed):
    """Rank 0's ``value`` on every rank (pickled; tensors travel on the CPU)."""
    if not context.enabled:
        return value
    holder = [value if context.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_to_main(value, context: Distributed) -> list | None:
    """Every rank's ``value`` (pickled), in rank order, on rank 0; None on the other ranks."""
    if not context.enabled:
        return [value]
    holder = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, holder, dst=0)
    return holder


def share_of(items: list, context: Distributed) -> list:
    """This rank's contiguous share of ``items`` (sizes differ by at most one; rank order is item order)."""
    count, rank, size = len(items), context.rank, context.world_size
    return items[rank * count // size : (rank + 1) * count // size]


def all_reduce_sum(tensor: torch.Tensor, context: Distributed) -> torch.Tensor:
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: int, context: Distributed) -> int:
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=collective_device())  # NCCL: CUDA tensors only
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def split_rows(row_lens: list[int], rows: list[int], world_size: int) -> list[list[int]]:
    """Whole trees split across ranks by token count: longest first onto the lightest rank; each
    rank keeps the trees in their original order."""
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for row in sorted(rows, key=lambda r: (-row_lens[r], r)):
        rank = min(range(world_size), key=lambda k: (loads[k], k))
        shares[rank].append(row)
        loads[rank] += row_lens[row]
    order = {row: i for i, row in enumerate(rows)}
    return [sorted(share, key=order.__getitem__) for share in shares]


def full_state_dict(model: torch.nn.Module, context: Distributed) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0 (empty elsewhere); a collective on every rank."""
    if not context.enabled:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_weights(sharded: torch.nn.Module, target: torch.nn.Module) -> None:
    """Every rank: ``sharded``'s full weights into ``target`` (keys ``model.<name>`` -> ``<name>``,
    as ``TreeForward`` wraps the model), one tensor at a time: each DTensor is all-gathered, copied
    and dropped, so no rank holds a second full copy. A collective: every rank calls it."""
    destination = target.state_dict()
    with torch.no_grad():
        for key, value in sharded.state_dict().items():
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            destination[key.removeprefix("model.")].copy_(value)


def save_sharded(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer with ``torch.distributed.checkpoint``: sharded, loadable on any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_sharded(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what ``save_sharded`` wrote (by any world size) into this rank's shards, or one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def shutdown(context: Distributed) -> None:
    """End of a successful run: the ranks leave together and tear the process group down while the
    interpreter is whole (NCCL warns otherwise, and gloo's threads can abort in its finalization).
    Not after a failure: the other ranks would wait for the failed one in the barrier."""
    if context.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(context: Distributed) -> None:
    if context.enabled:
        dist.barrier()
