"""FSDP2 with and without mixed precision on every rank of a ``torchrun`` job, for
tests/test_distributed.py (not a test itself).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT.pt

For each ``param_dtype`` (None, bfloat16) every rank builds the same tiny model and layout, shards
its policy with ``shard_policy`` and runs one forward and backward of the whole layout under bf16
autocast. Every rank has the same loss, so the averaged gradient is the one-process gradient. Rank 0
saves, per dtype: the gathered gradients, their dtype, the dtype of the shards, and the dtype of
the weight a decoder layer computed with.
"""

import os
import sys

import torch
import torch.distributed as dist
from test_policy_tree import random_rollouts, tiny_model

from anytime_kernels import pack_response_trees
from trainer.distributed import shard_policy
from trainer.policy import TreePolicy


def run(param_dtype: torch.dtype | None) -> dict:
    layout = pack_response_trees(*random_rollouts(seed=3))
    policy = TreePolicy(tiny_model("qwen2"), attention_backend="sdpa", autocast_dtype=torch.bfloat16)
    shard_policy(policy, param_dtype)
    seen = []
    down_proj = policy.model.model.layers[0].mlp.down_proj
    down_proj.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    result = policy.forward(layout)
    weights = torch.randn(result.logprobs.numel(), generator=torch.Generator().manual_seed(0))
    (result.logprobs * weights).sum().backward()
    grads = {name: p.grad.full_tensor() for name, p in policy.model.named_parameters() if p.grad is not None}
    return {
        "logprobs": result.logprobs.detach(),
        "grads": grads,
        "grad_dtypes": {str(g.dtype) for g in grads.values()},
        "shard_dtypes": {str(p.dtype) for p in policy.model.parameters()},
        "compute_dtype": str(seen[0]),
    }


def main() -> None:
    dist.init_process_group("gloo")
    results = {str(dtype): run(dtype) for dtype in (None, torch.bfloat16)}
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    os._exit(0)  # skip interpreter finalization, as tests/distributed_worker.py does (see there)
