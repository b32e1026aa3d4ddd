"""The hand-offs of one RL step after the rollout: scored rollouts, then the learner's batch.

``ThinkingBatch -> SummaryBatch`` come from the rollout engine (``trainer.rollout``); here:

- ``score_rollouts``: ``SummaryBatch -> ScoredBatch`` decodes every completion exactly as the
  reward rule reads it (``z[:c]`` + inserted delimiter + summary, EOS dropped), takes the format
  rule and the EOS rule from token ids, and calls the reward;
- ``build_train_batch``: ``ScoredBatch -> TrainBatch`` packs the response trees and turns the
  scores into per-token BRPO advantages aligned with the positions that predict them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from anytime_kernels import ResponseTreeLayout, brpo_advantages, pack_response_trees, token_advantages
from trainer.budgets import BudgetSchedule, distinct_cuts
from trainer.rollout import SummaryBatch


@dataclass
class ScoredBatch:
    """Rollouts with their rewards (N traces, S budget slots, A summaries per slot).

    Attributes:
        rollouts: the ``SummaryBatch`` (prompt/thinking ids ``[N]``, ``cut_lens [N, S]``, inserted
            ids per distinct cut, summary ids ``[N][S][A]``).
        scores: ``[N, S, A]`` float32 reward r[n, s, a].
        completions: ``[N][S][A]`` the decoded texts the reward read.
        format_ok: ``[N, S, A]`` bool, exactly one ``</think>`` token in cut thinking + summary.
        eos_in_cut: ``[N, S]`` bool, the cut holds the trace's EOS (scored 0).
        group_size: G, consecutive traces per prompt.
        reward_metrics: the reward's metrics.
    """

    rollouts: SummaryBatch
    scores: torch.Tensor
    completions: list[list[list[str]]]
    format_ok: torch.Tensor
    eos_in_cut: torch.Tensor
    group_size: int
    reward_metrics: dict[str, float]

    @property
    def num_traces(self) -> int:
        return int(self.scores.shape[0])


def score_rollouts(
    rollouts: SummaryBatch,
    answers: Sequence[object],
    tokenizer,
    reward: Callable,
    *,
    think_end_id: int,
    eos_token_ids: Sequence[int],
    group_size: int,
) -> ScoredBatch:
    """Decode and score every summary of ``rollouts``.

    Args:
        answers: ``[N]`` ground truth of every trace (the G traces of a prompt repeat it).
        reward: ``(completions, answers, *, format_ok, eos_in_cut) -> (scores, metrics)``.
        think_end_id: the ``</think>`` token id.
        eos_token_ids: every id that ends a sequence (a summary's trailing EOS is dropped).
    """
    num_traces = len(rollouts.thinking_ids)
    if len(answers) != num_traces:
        raise ValueError(f"got {len(answers)} answers for {num_traces} traces; expected one per trace")
    eos = {int(t) for t in eos_token_ids}
    num_slots = int(rollouts.cut_lens.shape[1])
    num_summaries = len(rollouts.summary_ids[0][0]) if num_traces else 1
    cut_lists = rollouts.cut_lens.tolist()
    # The cut thinking is decoded once per distinct cut, each branch once: the reward reads their concatenation.
    prefix_texts, prefix_ends, branch_ids, flat_answers, flat_format, flat_eos = [], [], [], [], [], []
    for n in range(num_traces):
        thinking = rollouts.thinking_ids[n]
        ended_with_eos = bool(thinking) and int(thinking[-1]) in eos
        distinct = distinct_cuts(cut_lists[n])
        cut_texts = tokenizer.batch_decode([thinking[:c] for c in distinct], skip_special_tokens=False)
        cut_think_ends = [sum(1 for t in thinking[:c] if int(t) == think_end_id) for c in distinct]
        for s in range(num_slots):
            d = distinct.index(cut_lists[n][s])
            inserted = list(rollouts.inserted_ids[n][d])
            in_cut = ended_with_eos and cut_lists[n][s] == len(thinking)
            for a in range(num_summaries):
                summary = list(rollouts.summary_ids[n][s][a])
                if summary and int(summary[-1]) in eos:
                    summary = summary[:-1]
                think_ends = cut_think_ends[d] + sum(1 for t in inserted + summary if int(t) == think_end_id)
                prefix_texts.append(cut_texts[d])
                branch_ids.append(inserted + summary)
                flat_answers.append(answers[n])
                flat_format.append(think_ends == 1)
                flat_eos.append(in_cut)
        prefix_ends.append(len(prefix_texts))
    branch_texts = tokenizer.batch_decode(branch_ids, skip_special_tokens=False) if branch_ids else []
    flat_completions = [prefix + branch for prefix, branch in zip(prefix_texts, branch_texts, strict=True)]
    scores, metrics = reward(flat_completions, flat_answers, format_ok=flat_format, eos_in_cut=flat_eos)
    shape = (num_traces, num_slots, num_summaries)
    completions = [
        [flat_completions[(n * num_slots + s) * num_summaries : (n * num_slots + s + 1) * num_summaries]
         for s in range(num_slots)]
        for n in range(num_traces)
    ]  # fmt: skip
    eos_in_cut = torch.tensor(flat_eos, dtype=torch.bool).view(shape)[:, :, 0] if num_traces else torch.zeros(0, 1)
    return ScoredBatch(
        rollouts=rollouts,
        scores=torch.tensor(scores, dtype=torch.float32).view(shape),
        completions=completions,
        format_ok=torch.tensor(flat_format, dtype=torch.bool).view(shape),
        eos_in_cut=eos_in_cut.bool(),
        group_size=group_size,
        reward_metrics=metrics,
    )


@dataclass
class TrainBatch:
    """What the learner trains on: packed trees and per-position targets (T packed tokens).

    Attributes:
        layout: the packed response trees (host tensors).
        advantages: ``[T]`` float32, the advantage of the target that position t predicts
            (``token_advantages(align="predicting")``; 0 where ``loss_mask`` is False).
        lineage_ids: ``[T]`` int64 sequence of each position's target, for loss aggregation.
        thinking_adv: ``[N, S]`` and ``summary_adv``: ``[N, S, A]``, for metrics.
        group_size: G.
        old_logprobs: ``[T]`` float32 on the learner's device, filled by the learner (the sampling
            policy's log-probs at each predicting position); None until then.
        ref_logprobs: ``[T]`` under the frozen reference policy when a KL term is used.
    """

    layout: ResponseTreeLayout
    advantages: torch.Tensor
    lineage_ids: torch.Tensor
    thinking_adv: torch.Tensor
    summary_adv: torch.Tensor
    group_size: int
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    @property
    def num_prompts(self) -> int:
        return self.layout.num_traces // self.group_size

    def prompt_rows(self, prompts: Sequence[int]) -> list[int]:
        """Trace rows of the given prompts (each prompt's G consecutive traces)."""
        return [p * self.group_size + g for p in prompts for g in range(self.group_size)]


def build_train_batch(
    scored: ScoredBatch, schedule: BudgetSchedule, *, variance_reduction: str, summary_method: str
) -> TrainBatch:
    """Pack the trees and compute BRPO advantages (``ARCHITECTURE.md``) for every trained position."""
    layout = pack_response_trees(*scored.rollouts.pack_arguments())
    thinking_adv, summary_adv = brpo_advantages(
        scored.scores,
        layout.cut_lens,
        scored.group_size,
        schedule.probs,
        variance_reduction=variance_reduction,
        summary_method=summary_method,
    )
    advantages = token_advantages(layout, thinking_adv, summary_adv, align="predicting")
    return TrainBatch(
        layout=layout,
        advantages=advantages,
        lineage_ids=layout.lineage_ids(),
        thinking_adv=thinking_adv,
        summary_adv=summary_adv,
        group_size=scored.group_size,
    )
