"""One RL step of AnytimeReasoner written apart from the trainer, to test the trainer against.

Everything here follows ARCHITECTURE.md's rules directly, with plain torch and one Hugging Face
forward per sequence (the thinking of a trace, and each summary branch on its own), and imports
nothing from ``anytime_kernels`` or ``trainer`` (no tree packing, fused log-probs, advantage
kernel, loss or learner): a bug the trainer shares with its own fast paths shows up as a
difference from this.

A rollout is given by hand as token ids: for each trace its prompt, thinking, answer, and per
budget slot ``A`` summaries. The step computes:

- the scores by the authors' rule (answer step, last ``\\boxed{``, one ``</think>`` token, a cut
  that holds the trace's EOS scores 0);
- the BRPO thinking advantages (returns, V1, V2 and the baseline) and summary advantages;
- the token losses: PPO-clip against the old policy's log-probs at the rollout temperature, the
  KL to a frozen reference, the entropy bonus, aggregated over each mini-batch;
- one AdamW update per mini-batch (gradient norm clipped, decoupled weight decay), over
  ``epochs`` passes in the order a seeded ``random.Random(seed)`` shuffle of the prompts gives.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import torch

THINK_END = "</think>"
HEADER = "**Final Answer**\n"
TRUNCATED_DELIMITER = "...\n\n...\n\n</think>\n\n**Final Answer**\n"
CLOSED_DELIMITER = "\n\n**Final Answer**\n"


@dataclass
class Trace:
    """One thinking trace with its summaries: ``summaries[s][a]`` ids (EOS kept when sampled)."""

    prompt: list[int]
    thinking: list[int]
    answer: str
    summaries: list[list[list[int]]]


@dataclass
class StepSettings:
    budgets: list[int]
    probs: list[float]
    group_size: int
    variance_reduction: str = "brpo"
    summary_method: str = "brpo"
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    aggregation: str = "token-sum-norm"
    norm_length: int = 64
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    mini_batch_prompts: int = 1
    epochs: int = 1
    seed: int = 0


# -- the rollout's structure ---------------------------------------------------------------------


def cuts(trace: Trace, budgets: list[int]) -> list[int]:
    return [min(budget, len(trace.thinking)) for budget in budgets]


def inserted_ids(trace: Trace, cut: int, tokenizer) -> list[int]:
    """The truncation mark and header after a cut short (or never closed) trace, the header alone
    after a trace that closed its thinking within the cut."""
    think_end = tokenizer.convert_tokens_to_ids(THINK_END)
    closed = cut == len(trace.thinking) and trace.thinking[-1] == think_end
    return tokenizer.encode(CLOSED_DELIMITER if closed else TRUNCATED_DELIMITER, add_special_tokens=False)


# -- scores by the authors' rule ------------------------------------------------------------------


def last_box(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth < 0:
            return text[begin:index]
    return None


def score(trace: Trace, cut: int, summary: list[int], tokenizer) -> float:
    eos, think_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(THINK_END)
    if cut == len(trace.thinking) and trace.thinking[-1] == eos:
        return 0.0
    summary = summary[:-1] if summary and summary[-1] == eos else summary
    inserted = inserted_ids(trace, cut, tokenizer)
    if sum(token == think_end for token in [*trace.thinking[:cut], *inserted, *summary]) != 1:
        return 0.0
    pieces = tokenizer.decode(inserted + summary).split("\n\n")
    step = next((piece for piece in pieces if piece.startswith(HEADER)), None)
    boxed = None if step is None else last_box(step)
    return float(boxed is not None and boxed.strip() == trace.answer)


def scores(traces: list[Trace], settings: StepSettings, tokenizer) -> torch.Tensor:
    """``[N, S, A]`` float64."""
    return torch.tensor(
        [
            [[score(t, c, summary, tokenizer) for summary in per_slot] for c, per_slot in zip(cuts(t, settings.budgets), t.summaries, strict=True)]
            for t in traces
        ],
        dtype=torch.float64,
    )  # fmt: skip


# -- advantages from the paper's formulas ---------------------------------------------------------


def brpo(r: torch.Tensor, cut_lens: list[list[int]], settings: StepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """``(thinking_adv [N, S], summary_adv [N, S, A])`` from ``r [N, S, A]``, loop by loop."""
    num_traces, num_slots, num_summaries = r.shape
    group, p = settings.group_size, settings.probs
    rbar = r.mean(dim=2)
    thinking = torch.zeros(num_traces, num_slots, dtype=torch.float64)
    for n in range(num_traces):
        members = range(n - n % group, n - n % group + group)
        for s in range(num_slots):
            ret = sum(p[k] * rbar[n, k] for k in range(s, num_slots))
            v2 = sum(sum(p[k] * rbar[m, k] for k in range(s, num_slots)) for m in members) / group if group > 1 else 0.0
            v1 = 0.0
            if s > 0:
                earlier = sum(2**k * rbar[n, k] for k in range(s)) / sum(2**k for k in range(s))
                v1 = earlier * sum(p[s:])
            baseline = {"brpo": (s * v1 + (num_slots - s) * v2) / num_slots, "v1only": v1, "v2only": v2,
                        "none": 0.0}[settings.variance_reduction]  # fmt: skip
            thinking[n, s] = ret - baseline
    summary = torch.zeros_like(r)
    for n in range(num_traces):
        members = range(n - n % group, n - n % group + group)
        for s in range(num_slots):
            for a in range(num_summaries):
                if num_summaries == 1:
                    baseline = sum(r[m, s, 0] for m in members) / group
                else:
                    shared = [r[n, k, b] for k in range(num_slots) if cut_lens[n][k] == cut_lens[n][s]
                              for b in range(num_summaries)]  # fmt: skip
                    baseline = sum(shared) / len(shared) if len(shared) > 1 else 0.0
                last = s == num_slots - 1 and a == num_summaries - 1
                kept = settings.summary_method == "brpo" or last
                summary[n, s, a] = r[n, s, a] - baseline if kept else 0.0
    return thinking, summary


# -- per-sequence forwards ------------------------------------------------------------------------


@dataclass
class Sequence_:
    """One sequence as the model reads it, its trained tokens and their advantages.

    ``targets[i]`` is the token at ``positions[i] + 1``; ``trace`` its trace's index;
    ``lineage`` the thinking (-1) or the summary branch ``(s, a)`` it belongs to.
    """

    ids: list[int]
    positions: list[int]
    targets: list[int]
    advantages: list[float]
    trace: int
    lineage: object = field(default=-1)


def sequences(traces: list[Trace], thinking_adv, summary_adv, settings: StepSettings, tokenizer) -> list[Sequence_]:
    """The thinking of every trace and every summary branch, each as its own sequence."""
    out = []
    for n, trace in enumerate(traces):
        trace_cuts = cuts(trace, settings.budgets)
        prompt_len = len(trace.prompt)
        # Thinking token j (segment s: the first slot whose cut is past it) has position P + j and is
        # predicted by position P + j - 1.
        advantages = [float(thinking_adv[n, next(s for s, c in enumerate(trace_cuts) if j < c)])
                      for j in range(len(trace.thinking))]  # fmt: skip
        out.append(Sequence_(trace.prompt + trace.thinking,
                             [prompt_len + j - 1 for j in range(len(trace.thinking))],
                             list(trace.thinking), advantages, n))  # fmt: skip
        for s, cut in enumerate(trace_cuts):
            prefix = trace.prompt + trace.thinking[:cut] + inserted_ids(trace, cut, tokenizer)
            for a, summary in enumerate(trace.summaries[s]):
                out.append(Sequence_(prefix + summary, [len(prefix) + i - 1 for i in range(len(summary))],
                                     list(summary), [float(summary_adv[n, s, a])] * len(summary), n, (s, a)))  # fmt: skip
    return out


def token_terms(model, sequence: Sequence_, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[T]`` of the sequence's targets at the temperature, and the entropy ``[T]`` of each
    predicting position's distribution."""
    logits = model(input_ids=torch.tensor([sequence.ids])).logits[0].double() / temperature
    logp = torch.log_softmax(logits[sequence.positions], dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logp[torch.arange(len(sequence.targets)), torch.tensor(sequence.targets)], entropy


def kl(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    log_ratio = ref - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(log_ratio) - 1 - log_ratio


def mini_batch_loss(model, batch: list[Sequence_], old: dict, ref: dict, num_traces: int, settings: StepSettings):
    """The loss of one mini-batch's sequences (``old``/``ref``: log-probs by sequence id)."""
    token_losses = []
    for sequence in batch:
        logp, entropy = token_terms(model, sequence, settings.temperature)
        advantage = torch.tensor(sequence.advantages, dtype=torch.float64)
        ratio = torch.exp(logp - old[id(sequence)])
        clipped = ratio.clamp(1 - settings.clip_low, 1 + settings.clip_high)
        loss = torch.maximum(-advantage * ratio, -advantage * clipped)
        if settings.dual_clip is not None:
            loss = torch.where(advantage < 0, torch.minimum(loss, -settings.dual_clip * advantage), loss)
        if settings.kl_coef > 0:
            loss = loss + settings.kl_coef * kl(logp, ref[id(sequence)], settings.kl_estimator)
        loss = loss - settings.entropy_coef * entropy
        token_losses.append(loss)
    if settings.aggregation == "token-sum-norm":
        return sum(loss.sum() for loss in token_losses) / (num_traces * settings.norm_length)
    if settings.aggregation == "token-mean":
        return sum(loss.sum() for loss in token_losses) / sum(loss.numel() for loss in token_losses)
    if settings.aggregation == "seq-mean-token-mean":
        return sum(loss.mean() for loss in token_losses) / len(token_losses)
    return sum(loss.sum() / settings.norm_length for loss in token_losses) / len(token_losses)


def adamw_step(parameters: list[torch.Tensor], state: dict, step: int, settings: StepSettings) -> None:
    """Clip the gradients' global norm, then one AdamW step (decoupled weight decay, bias correction)."""
    grads = [p.grad.double() for p in parameters]
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    if settings.grad_clip is not None and norm > settings.grad_clip:
        grads = [g * (settings.grad_clip / (norm + 1e-6)) for g in grads]
    beta1, beta2 = settings.betas
    with torch.no_grad():
        for p, g in zip(parameters, grads, strict=True):
            m, v = state.setdefault(id(p), (torch.zeros_like(g), torch.zeros_like(g)))
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            state[id(p)] = (m, v)
            m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
            updated = p.double() * (1 - settings.lr * settings.weight_decay)
            p.copy_(updated - settings.lr * m_hat / (v_hat.sqrt() + settings.eps))


def reference_step(model, ref_model, traces: list[Trace], settings: StepSettings, tokenizer):
    """The trained model (a copy; ``model`` is left alone) and the step's scores and advantages."""
    r = scores(traces, settings, tokenizer)
    cut_lens = [cuts(t, settings.budgets) for t in traces]
    thinking_adv, summary_adv = brpo(r, cut_lens, settings)
    all_sequences = sequences(traces, thinking_adv, summary_adv, settings, tokenizer)
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        old = {id(q): token_terms(model, q, settings.temperature)[0] for q in all_sequences}
        ref = {id(q): token_terms(ref_model, q, settings.temperature)[0] for q in all_sequences}
    parameters = list(model.parameters())
    state: dict = {}
    rng = random.Random(settings.seed)
    num_prompts = len(traces) // settings.group_size
    step = 0
    for _ in range(settings.epochs):
        order = list(range(num_prompts))
        rng.shuffle(order)
        for start in range(0, num_prompts, settings.mini_batch_prompts):
            prompts = set(order[start : start + settings.mini_batch_prompts])
            batch = [q for q in all_sequences if q.trace // settings.group_size in prompts]
            model.zero_grad(set_to_none=True)
            mini_batch_loss(model, batch, old, ref, len(prompts) * settings.group_size, settings).backward()
            step += 1
            adamw_step(parameters, state, step, settings)
    return model, r, thinking_adv, summary_adv
