"""Sampling on the device, reproducible per (row seed, output position), with the sampled token's log-prob.

Every op has a fixed shape and reads nothing back to the host, so the decode step that calls
:func:`sample` can be captured in a CUDA graph. Randomness is counter-based: the uniform of a row
at output position j is a hash of ``(seed, j)`` (``seed`` drawn per row from the engine's
generator), and the token is drawn by inverse CDF from that one uniform. A row's tokens thus do
not depend on which other rows share its batch, nor on when the engine syncs or refills rows.

Settings per row: temperature (0: greedy), top-p (the smallest set of most likely tokens whose
mass reaches it, renormalised), and ``min_new_tokens`` (the row's stop ids are impossible until it
generated that many tokens). The log-prob returned with each token is
``log_softmax(logits / T)`` of it (T = 1 for greedy rows), before the top-p and ``min_new_tokens``
masks: what the learner computes for that token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_LOW32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd multiplier of a 32-bit integer finaliser; < 2^27, so x * _MIX fits an int64
_UNIFORM_BITS = 23  # (k + 0.5) / 2^23 is exact in fp32 and strictly inside (0, 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mix of int64 ``x`` holding values in ``[0, 2^32)``."""
    x = ((x >> 16) ^ x) * _MIX & _LOW32
    x = ((x >> 16) ^ x) * _MIX & _LOW32
    return (x >> 16) ^ x


def uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64 uniforms in (0, 1), a function of ``seeds [B]`` int64 and ``positions [B]`` int."""
    low, high = seeds & _LOW32, (seeds >> 32) & _LOW32
    x = _mix32(_mix32(positions.long() & _LOW32) ^ low)
    x = _mix32(x ^ high)
    return ((x >> (32 - _UNIFORM_BITS)).double() + 0.5) / 2**_UNIFORM_BITS


@dataclass
class RowSettings:
    """Per-row sampling settings, device tensors of B rows (views of the decode buffers).

    Attributes:
        temperature: ``[B]`` float64, 0 for greedy rows (a float32 0.8 would scale fp64 logits by
            another temperature).
        top_p: ``[B]`` float64 in (0, 1].
        min_new_tokens: ``[B]`` int64.
        seeds: ``[B]`` int64, the row's random stream.
        stop_ids: ``[B, S]`` int64 stop ids; a row with fewer than S repeats its first one.
        stop_valid: ``[B, S]`` bool, False where a row has no stop id at all.
    """

    temperature: torch.Tensor
    top_p: torch.Tensor
    min_new_tokens: torch.Tensor
    seeds: torch.Tensor
    stop_ids: torch.Tensor
    stop_valid: torch.Tensor


def _inverse_cdf(cdf: torch.Tensor, targets: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of ``cdf [B, V]`` (running sums) above ``targets [B]``, below ``count [B]``."""
    index = torch.searchsorted(cdf, targets[:, None].to(cdf.dtype), right=True)[:, 0]
    return torch.minimum(index, count - 1)


def sample(
    logits: torch.Tensor, rows: RowSettings, generated: torch.Tensor, *, nucleus: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token of every row and its log-prob.

    Args:
        logits: ``[B, V]`` next-token logits (computed in fp32 at least; fp64 stays fp64).
        rows: the rows' settings.
        generated: ``[B]`` tokens each row generated so far (the output position of this token).
        nucleus: whether any row has ``top_p < 1`` (decided on the host; sorting costs a pass
            over ``[B, V]`` that the other rows do not need).

    Returns:
        ``tokens [B]`` int64 and ``logprobs [B]`` (fp32 or fp64, as the logits).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    greedy = rows.temperature == 0
    temperature = torch.where(greedy, 1.0, rows.temperature).to(logits.dtype)
    scaled = logits / temperature[:, None]
    normaliser = torch.logsumexp(scaled, dim=-1)
    blocked = (generated < rows.min_new_tokens)[:, None] & rows.stop_valid
    stop_logits = torch.where(blocked, float("-inf"), scaled.gather(1, rows.stop_ids))
    allowed = scaled.scatter(1, rows.stop_ids, stop_logits)
    probs = torch.softmax(allowed, dim=-1)
    target = uniforms(rows.seeds, generated)
    cdf = probs.cumsum(dim=-1)
    vocab = torch.full_like(generated, probs.shape[-1], dtype=torch.long)
    tokens = _inverse_cdf(cdf, target * cdf[:, -1], vocab)
    if nucleus:
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered_cdf = ordered.cumsum(dim=-1)
        # The nucleus: the sorted tokens whose preceding mass is below top_p; sample inside its mass.
        count = ((ordered_cdf - ordered) < rows.top_p[:, None].to(ordered.dtype)).sum(dim=-1)
        mass = ordered_cdf.gather(1, (count - 1)[:, None])[:, 0]
        chosen = _inverse_cdf(ordered_cdf, target * mass, count)
        tokens = torch.where(rows.top_p < 1, order.gather(1, chosen[:, None])[:, 0], tokens)
    # A rounding of the running sum can land on a token of probability 0 (a blocked stop id at
    # the end of the vocabulary): take the most likely token there instead.
    best = allowed.argmax(dim=-1)
    tokens = torch.where(greedy | (probs.gather(1, tokens[:, None])[:, 0] == 0), best, tokens)
    logprobs = scaled.gather(1, tokens[:, None])[:, 0] - normaliser
    return tokens, logprobs
