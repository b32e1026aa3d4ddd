"""Weight sync over a process group joined by the trainer and the SGLang servers (no shared disk).

SGLang's ``/init_weights_update_group`` makes every server rank join a process group of its own
(``world_size`` = the trainer's rank 0 plus every server rank, the trainer at rank 0), rendezvousing
at ``tcp://master_address:master_port`` under ``group_name``; ``/update_weights_from_distributed``
then receives each named tensor by a broadcast from rank 0. This module builds that group on
either side the way SGLang does (a TCP rendezvous, a store prefixed by the group name, a group
outside the default world), so it coexists with the trainer's own ``torch.distributed`` world
(FSDP2 under torchrun): NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import inspect
from datetime import timedelta

import torch
import torch.distributed as dist


def init_weights_group(
    backend: str,
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Join the weight-update group as ``rank`` of ``world_size`` (blocks until every rank joins)."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a weight-update group of {world_size}")
    # Joining again under the same name (servers restarted, a new engine in this process) replaces
    # the old group: torch refuses a second group of one name.
    for existing, name in list(_world.pg_names.items()):
        if name == group_name:
            dist.destroy_process_group(existing)
    timeout = timedelta(seconds=timeout_s)
    host = f"[{master_address}]" if ":" in master_address and not master_address.startswith("[") else master_address
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{master_port}", rank, world_size,
                                              timeout=timeout))  # fmt: skip
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    options = (
        "backend_options"
        if "backend_options" in inspect.signature(_new_process_group_helper).parameters
        else "pg_options"
    )
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout, **{options: None}
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def tensor_metadata(bucket: list[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """``names``, ``dtypes`` (``torch`` attribute names, as SGLang reads them) and ``shapes`` of a bucket."""
    return {
        "names": [name for name, _ in bucket],
        "dtypes": [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket],
        "shapes": [list(tensor.shape) for _, tensor in bucket],
    }


def broadcast_bucket(bucket: list[tuple[str, torch.Tensor]], group: dist.ProcessGroup, device: torch.device) -> None:
    """Send every tensor of ``bucket`` from rank 0, in order (the servers receive in the same order)."""
    for _, tensor in bucket:
        dist.broadcast(tensor.detach().to(device).contiguous(), src=0, group=group)


def receive_bucket(metadata: dict, group: dist.ProcessGroup, device: torch.device) -> dict[str, torch.Tensor]:
    """The server side of :func:`broadcast_bucket`."""
    received = {}
    for name, dtype, shape in zip(metadata["names"], metadata["dtypes"], metadata["shapes"], strict=True):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(tensor, src=0, group=group)
        received[name] = tensor
    return received


def weight_buckets(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """``state`` as lists of ``(name, tensor)`` of at most ``max_bytes`` each (a larger tensor alone)."""
    buckets: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if buckets[-1] and size + nbytes > max_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, tensor.detach()))
        size += nbytes
    return buckets if buckets[0] else []


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state`` with floating-point tensors in ``dtype`` (None: unchanged). Tensors that share storage
    (tied embeddings) stay shared, so a save keeps writing them once."""
    if dtype is None:
        return state
    converted: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[name] = tensor
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if key not in converted:
            converted[key] = tensor.detach().to(dtype)
        out[name] = converted[key]
    return out
