"""Rollout engines: G thinking traces per prompt, then summaries forked from every budget cut.

``EmbeddedEngine`` (a Hugging Face model in this process over a paged KV pool, CPU or CUDA) and
``SGLangEngine`` (HTTP client of ``sglang.launch_server``) share the interface of ``RolloutEngine``;
``SGLangInProcessEngine`` wraps ``sglang.Engine`` for colocated training. The SGLang-protocol
test server lives apart, in ``trainer.rollout.testing``.
"""

from trainer.rollout.base import (
    SUMMARY_MAX_NEW_TOKENS,
    GenerationOutput,
    GenerationRequest,
    PhaseStats,
    RolloutEngine,
    RolloutStats,
    SamplingParams,
    SummaryBatch,
    ThinkingBatch,
)
from trainer.rollout.embedded import EmbeddedEngine
from trainer.rollout.forks import Fork, deal_summaries, plan_forks
from trainer.rollout.radix import RadixIndex
from trainer.rollout.sglang_client import SGLangEngine, SGLangServerError
from trainer.rollout.sglang_server import SGLangInProcessEngine, SGLangServerProcess, sglang_server_command

__all__ = [
    "SUMMARY_MAX_NEW_TOKENS",
    "EmbeddedEngine",
    "Fork",
    "GenerationOutput",
    "GenerationRequest",
    "PhaseStats",
    "RadixIndex",
    "RolloutEngine",
    "RolloutStats",
    "SGLangEngine",
    "SGLangInProcessEngine",
    "SGLangServerError",
    "SGLangServerProcess",
    "SamplingParams",
    "SummaryBatch",
    "ThinkingBatch",
    "deal_summaries",
    "plan_forks",
    "sglang_server_command",
]
