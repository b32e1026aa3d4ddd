"""The policy loss against hand-computed cases: clipping on both sides, dual clip, every aggregation
mode, every KL estimator, the entropy bonus; and micro-batch splits that leave the loss unchanged."""

import math

import pytest
import torch

from trainer.loss import kl_penalty, policy_loss, token_weights


def loss_of(logprobs, old, advantages, weights=None, **kwargs):
    logprobs = torch.tensor(logprobs, dtype=torch.float64)
    count = logprobs.numel()
    weights = torch.ones(count, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    return policy_loss(
        logprobs, torch.tensor(old, dtype=torch.float64), torch.tensor(advantages, dtype=torch.float64), weights,
        **kwargs,
    )  # fmt: skip


class TestClipping:
    # ratio = exp(logprob - old); log(1.5) and log(0.5) give ratios 1.5 and 0.5.
    UP, DOWN = math.log(1.5), math.log(0.5)

    def test_positive_advantage_is_clipped_above(self):
        terms = loss_of([self.UP], [0.0], [2.0])
        assert terms.loss.item() == pytest.approx(-2.0 * 1.2)  # max(-2*1.5, -2*1.2) = -2.4
        assert terms.sums["clipped"].item() == 1.0

    def test_negative_advantage_is_clipped_below(self):
        terms = loss_of([self.DOWN], [0.0], [-2.0])
        assert terms.loss.item() == pytest.approx(2.0 * 0.8)  # max(2*0.5, 2*0.8) = 1.6
        assert terms.sums["clipped"].item() == 1.0

    def test_no_clipping_where_the_ratio_moves_against_the_advantage(self):
        assert loss_of([self.DOWN], [0.0], [2.0]).loss.item() == pytest.approx(-2.0 * 0.5)
        assert loss_of([self.UP], [0.0], [-2.0]).loss.item() == pytest.approx(2.0 * 1.5)
        assert loss_of([self.UP], [0.0], [-2.0]).sums["clipped"].item() == 0.0

    def test_separate_low_and_high_epsilon(self):
        assert loss_of([self.UP], [0.0], [1.0], clip_high=0.28).loss.item() == pytest.approx(-1.28)
        assert loss_of([self.DOWN], [0.0], [-1.0], clip_low=0.1).loss.item() == pytest.approx(0.9)

    def test_dual_clip_bounds_negative_advantages(self):
        big = math.log(5.0)  # ratio 5 with A = -1: PPO loss 5, dual clip c=3 caps it at 3
        assert loss_of([big], [0.0], [-1.0]).loss.item() == pytest.approx(5.0)
        assert loss_of([big], [0.0], [-1.0], dual_clip=3.0).loss.item() == pytest.approx(3.0)
        assert loss_of([big], [0.0], [1.0], dual_clip=3.0).loss.item() == pytest.approx(-1.2)  # A > 0 untouched

    def test_gradient_is_zero_when_clipped(self):
        logprobs = torch.tensor([self.UP, 0.0], dtype=torch.float64, requires_grad=True)
        terms = policy_loss(logprobs, torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64),
                            torch.ones(2, dtype=torch.float64))  # fmt: skip
        terms.loss.backward()
        assert logprobs.grad.tolist() == pytest.approx([0.0, -1.0])  # d(-A r)/dlogp = -A r at r = 1


class TestAggregation:
    # Two sequences: lineage 0 has 3 tokens, lineage 5 has 1; two traces; constant 10.
    LINEAGE = torch.tensor([0, 0, 0, 5])

    def test_token_sum_norm(self):
        weights = token_weights("token-sum-norm", self.LINEAGE, num_traces=2, norm_length=10)
        assert weights.tolist() == pytest.approx([1 / 20] * 4)

    def test_token_mean(self):
        assert token_weights("token-mean", self.LINEAGE, 2).tolist() == pytest.approx([0.25] * 4)

    def test_seq_mean_token_mean(self):
        weights = token_weights("seq-mean-token-mean", self.LINEAGE, 2)
        assert weights.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])

    def test_seq_mean_token_sum_norm(self):
        weights = token_weights("seq-mean-token-sum-norm", self.LINEAGE, 2, norm_length=10)
        assert weights.tolist() == pytest.approx([1 / 20] * 4)

    def test_full_loss_with_weights(self):
        # Unclipped ratios of 1: token losses are -A; seq-mean-token-mean of (-1, -2, -3 | -4) = mean(-2, -4) = -3.
        weights = token_weights("seq-mean-token-mean", self.LINEAGE, 2)
        terms = loss_of([0.0] * 4, [0.0] * 4, [1.0, 2.0, 3.0, 4.0], weights.tolist())
        assert terms.loss.item() == pytest.approx(-3.0)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="aggregation must be one of"):
            token_weights("sum", self.LINEAGE, 2)
        with pytest.raises(ValueError, match="needs norm_length >= 1"):
            token_weights("token-sum-norm", self.LINEAGE, 2)

    def test_micro_batch_split_leaves_the_loss_unchanged(self):
        torch.manual_seed(0)
        logprobs, old, advantages = torch.randn(10) * 0.1, torch.randn(10) * 0.1, torch.randn(10)
        lineage = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])
        weights = token_weights("seq-mean-token-mean", lineage, 2)
        whole = policy_loss(logprobs, old, advantages, weights).loss
        split = sum(
            policy_loss(logprobs[s], old[s], advantages[s], weights[s]).loss for s in (slice(0, 4), slice(4, 10))
        )
        torch.testing.assert_close(split, whole)


class TestKLAndEntropy:
    def test_estimators_by_hand(self):
        logprobs, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log r = ref - logp = -0.5
        assert kl_penalty(logprobs, ref, "k1").item() == pytest.approx(0.5)
        assert kl_penalty(logprobs, ref, "k2").item() == pytest.approx(0.125)
        assert kl_penalty(logprobs, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
        with pytest.raises(ValueError, match="kl estimator must be one of"):
            kl_penalty(logprobs, ref, "k4")

    def test_k3_is_unbiased_for_the_true_kl(self):
        # Sampling from p, the mean of k1 and k3 both estimate KL(p || q); k3 with lower variance.
        p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.3, 0.2])
        true_kl = float((p * (p / q).log()).sum())
        samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
        for estimator in ("k1", "k3"):
            estimate = kl_penalty(p.log()[samples], q.log()[samples], estimator).mean().item()
            assert estimate == pytest.approx(true_kl, abs=3e-3), estimator

    def test_kl_and_entropy_terms_enter_the_loss(self):
        base = loss_of([0.0], [0.0], [1.0]).loss.item()  # -1
        with_kl = loss_of([0.0], [0.0], [1.0], ref_logprobs=torch.tensor([-0.5], dtype=torch.float64), kl_coef=0.1,
                          kl_estimator="k1").loss.item()  # fmt: skip
        assert with_kl == pytest.approx(base + 0.1 * 0.5)
        entropy = torch.tensor([2.0], dtype=torch.float64)
        assert loss_of([0.0], [0.0], [1.0], entropy=entropy, entropy_coef=0.01).loss.item() == pytest.approx(
            base - 0.02
        )
        with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logprobs"):
            loss_of([0.0], [0.0], [1.0], kl_coef=0.1)
