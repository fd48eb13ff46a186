"""Hand-checked numbers for npo.algo: advantages, log-probs, entropy, aggregation, losses, KL.

Run: .venv/bin/python -m pytest tests/test_algo.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from npo.algo import (
    agg_loss,
    compute_advantages,
    drgrpo_advantages,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    policy_loss,
    register_adv_estimator,
    token_logprobs,
    zero_variance_fraction,
)
from npo.config import AdvEstimator, KLEstimator, LossAgg

torch.set_num_threads(1)

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
EPS = 1e-6


# --------------------------------------------------------------------------- advantages
def test_grpo_advantages_hand_values():
    # group 0: mean .5, deviations ±.5, unbiased var = 4·.25/3 = 1/3 → A = ±.5/√(1/3) ≈ ±0.866
    a0 = 0.5 / (math.sqrt(1 / 3) + EPS)
    # group 2: mean .25, deviations (-.25, -.25, -.25, .75), var = (3·.0625 + .5625)/3 = .25,
    # std .5 → A = -.5 (x3), 1.5
    lo, hi = -0.25 / (0.5 + EPS), 0.75 / (0.5 + EPS)
    expected = torch.tensor([[a0, -a0, -a0, a0], [0.0, 0.0, 0.0, 0.0], [lo, lo, lo, hi]])
    got = grpo_advantages(REWARDS, EPS)
    assert_close(got, expected)
    assert got[0, 0].item() == pytest.approx(0.866025, abs=1e-5)
    assert torch.equal(got[1], torch.zeros(4))  # zero-variance group: exactly 0


def test_drgrpo_advantages_are_r_minus_mean():
    expected = torch.tensor(
        [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [-0.25, -0.25, -0.25, 0.75]]
    )
    assert_close(drgrpo_advantages(REWARDS), expected)


def test_registry_lookup_by_str_and_enum():
    by_str = compute_advantages("grpo", REWARDS)
    by_enum = compute_advantages(AdvEstimator.grpo, REWARDS)
    assert_close(by_str, grpo_advantages(REWARDS))
    assert_close(by_enum, by_str)
    assert_close(compute_advantages("drgrpo", REWARDS), drgrpo_advantages(REWARDS))
    for name in AdvEstimator:  # every configurable estimator is registered
        assert compute_advantages(name, REWARDS).shape == REWARDS.shape


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'rloo'.*drgrpo.*grpo"):
        compute_advantages("rloo", REWARDS)
    with pytest.raises(ValueError, match="already registered"):
        register_adv_estimator(AdvEstimator.grpo)(drgrpo_advantages)
    with pytest.raises(ValueError, match=r"\[N, G\]"):
        compute_advantages("grpo", REWARDS.flatten())


def test_int_rewards_accepted():
    assert_close(compute_advantages("drgrpo", REWARDS.long()), drgrpo_advantages(REWARDS))


def test_zero_variance_fraction():
    assert zero_variance_fraction(REWARDS) == pytest.approx(1 / 3)
    assert zero_variance_fraction(torch.zeros(2, 5)) == 1.0
    assert zero_variance_fraction(torch.eye(3)) == 0.0
    assert zero_variance_fraction(torch.zeros(0, 4)) == 0.0


def _loop_advantages(rewards: torch.Tensor, use_std: bool) -> torch.Tensor:
    out = torch.empty_like(rewards)
    for i, group in enumerate(rewards.tolist()):
        g = len(group)
        mean = sum(group) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (g - 1))
        for j, r in enumerate(group):
            out[i, j] = (r - mean) / (std + EPS) if use_std else r - mean
    return out


@pytest.mark.parametrize("name", ["grpo", "drgrpo"])
def test_vectorised_matches_python_loop(name):
    gen = torch.Generator().manual_seed(0)
    binary = torch.randint(0, 2, (64, 8), generator=gen).double()
    dense = torch.rand(64, 8, generator=gen, dtype=torch.float64)
    for rewards in (binary, dense):
        expected = _loop_advantages(rewards, use_std=name == "grpo")
        assert_close(compute_advantages(name, rewards, EPS), expected)


# --------------------------------------------------------------------------- log-probs
def test_token_logprobs_hand_example():
    # position 0: logits (0, 0, 0) → p = 1/3 each; position 1: (ln 3, 0, 0) → p = (3/5, 1/5, 1/5)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0]]])
    tokens = torch.tensor([[2, 1]])
    assert_close(token_logprobs(logits, tokens), torch.tensor([[math.log(1 / 3), math.log(1 / 5)]]))
    # temperature 2: position 1 → (ln √3, 0, 0) → p(token 1) = 1 / (√3 + 2); position 0 unchanged
    expected_t2 = torch.tensor([[math.log(1 / 3), math.log(1 / (math.sqrt(3) + 2))]])
    assert_close(token_logprobs(logits, tokens, temperature=2.0), expected_t2)


def test_token_logprobs_float32_from_bf16():
    logits = torch.randn(2, 3, 7).bfloat16()
    tokens = torch.randint(0, 7, (2, 3))
    got = token_logprobs(logits, tokens)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    assert_close(got, ref)


def test_entropy_from_logits():
    uniform = torch.zeros(2, 3, 5)
    assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(5)))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    # -inf logits are masked vocabulary: (0, 0, -inf) is a fair coin, entropy ln 2
    masked = torch.tensor([[[0.0, 0.0, -math.inf]]])
    assert entropy_from_logits(masked).item() == pytest.approx(math.log(2))


# --------------------------------------------------------------------------- aggregation
VALUES = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0], [5.0, 5.0, 5.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])


def test_agg_loss_modes_differ():
    # token-mean: (1 + 2 + 3 + 10) / 4 = 4; seq-mean: mean(2, 10) = 6 (empty row 3 skipped)
    assert agg_loss(VALUES, MASK, LossAgg.token_mean).item() == pytest.approx(4.0)
    assert agg_loss(VALUES, MASK, "seq-mean-token-mean").item() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="token-mean"):
        agg_loss(VALUES, MASK, "sum")


def test_agg_loss_ignores_garbage_off_mask():
    values = VALUES.clone()
    values[1, 1:] = torch.tensor([math.inf, math.nan])
    values.requires_grad_(True)
    loss = agg_loss(values, MASK, LossAgg.token_mean)
    loss.backward()
    assert loss.item() == pytest.approx(4.0)
    assert_close(values.grad, MASK.float() / 4)


@pytest.mark.parametrize("mode", list(LossAgg))
def test_agg_loss_empty_mask_is_zero_with_grad(mode):
    values = torch.ones(2, 3, requires_grad=True)
    loss = agg_loss(values, torch.zeros(2, 3), mode)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(values.grad, torch.zeros(2, 3))


# --------------------------------------------------------------------------- policy loss
def _logp(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp with grad, old_logp) such that exp(logp - old_logp) = ratios."""
    old = torch.full((len(ratios), len(ratios[0])), -1.0)
    logp = (old + torch.tensor(ratios).log()).requires_grad_(True)
    return logp, old


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    logp, old = _logp([[1.0, 1.0], [1.0, 1.0]])
    adv = torch.tensor([1.0, -2.0])  # per sequence, broadcast over its 2 tokens
    loss, metrics = policy_loss(logp, old, adv, torch.ones(2, 2), 0.2, 0.28, LossAgg.token_mean)
    # token advantages (1, 1, -2, -2): mean -0.5 → loss 0.5
    assert loss.item() == pytest.approx(0.5)
    assert metrics == pytest.approx(
        {
            "actor/pg_loss": 0.5,
            "actor/pg_clipfrac": 0.0,
            "actor/ppo_kl": 0.0,
            "actor/ratio_mean": 1.0,
            "actor/ratio_max": 1.0,
        }
    )


# (A, ratio, clip_low, clip_high, expected per-token loss, clipped branch active)
SINGLE_TOKEN_CASES = [
    (1.0, 1.5, 0.2, 0.28, -1.28, True),  # A>0 above 1+high: capped at 1.28
    (-1.0, 0.5, 0.2, 0.28, 0.8, True),  # A<0 below 1-low: max(.5, .8) = .8
    (1.0, 0.5, 0.2, 0.28, -0.5, False),  # A>0 below 1-low: max(-.5, -.8) keeps unclipped
    (-1.0, 1.5, 0.2, 0.28, 1.5, False),  # A<0 above 1+high: max(1.5, 1.28) keeps unclipped
    (2.0, 1.25, 0.2, 0.28, -2.5, False),  # inside clip-higher bound: -2·1.25
    (2.0, 1.25, 0.2, 0.2, -2.4, True),  # same token, symmetric .2: -2·1.2
]


@pytest.mark.parametrize(("adv", "ratio", "low", "high", "expected", "clipped"), SINGLE_TOKEN_CASES)
def test_policy_loss_single_token(adv, ratio, low, high, expected, clipped):
    logp, old = _logp([[ratio]])
    loss, metrics = policy_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), low, high)
    loss.backward()
    assert loss.item() == pytest.approx(expected)
    assert metrics["actor/pg_clipfrac"] == (1.0 if clipped else 0.0)
    assert metrics["actor/ppo_kl"] == pytest.approx(-math.log(ratio))
    # d(-A·ρ)/d logp = -A·ρ where unclipped; 0 where the clipped constant wins
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -adv * ratio)


def test_policy_loss_asymmetric_bounds_batch():
    # per-token A (1, 1, -1, -1), ratios (1.25, 1.3, .85, .75), bounds [.8, 1.28]:
    # -1.25 (in), -1.28 (clipped), .85 (in), .8 (clipped) → sum -.88, mean -.22, clipfrac .5
    logp, old = _logp([[1.25, 1.3, 0.85, 0.75]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-0.22)
    assert metrics["actor/pg_clipfrac"] == 0.5
    assert metrics["actor/ratio_mean"] == pytest.approx((1.25 + 1.3 + 0.85 + 0.75) / 4)
    assert metrics["actor/ratio_max"] == pytest.approx(1.3)
    # symmetric .2: 1.25 → 1.2 clipped too: (-1.2 - 1.2 + .85 + .8) / 4 = -.1875, clipfrac .75
    loss_sym, metrics_sym = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert loss_sym.item() == pytest.approx(-0.1875)
    assert metrics_sym["actor/pg_clipfrac"] == 0.75


def test_policy_loss_gradient_and_mask():
    # 2 x 3 batch; last token of row 1 is padding with a garbage log-ratio of +100
    ratios = [[1.0, 1.5, 0.5], [0.9, 0.7, 1.0]]
    logp, old = _logp(ratios)
    with torch.no_grad():
        logp[1, 2] = 99.0  # exp(100) would overflow without masking
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = policy_loss(logp, old, adv, mask, 0.2, 0.28)
    loss.backward()
    # row 0 (A=1): -1, -1.28 (clipped), -.5 (A>0 below bound: unclipped)
    # row 1 (A=-1): .9, .8 (clipped: max(.7, .8)); n = 5 → (-2.78 + 1.7) / 5 = -.216
    assert loss.item() == pytest.approx(-0.216)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(2 / 5)
    n = 5
    expected_grad = torch.tensor(
        [[-1.0 * 1.0 / n, 0.0, -1.0 * 0.5 / n], [1.0 * 0.9 / n, 0.0, 0.0]]
    )  # -A·ρ/n where unclipped, 0 where clipped or masked
    assert_close(logp.grad, expected_grad)
    assert math.isfinite(metrics["actor/ratio_max"])


def test_policy_loss_is_weights_scale_tokens():
    logp, old = _logp([[1.0, 1.0]])
    weights = torch.tensor([[2.0, 0.5]])
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, is_weights=weights)
    # per-token -1 · (2, .5) → mean -1.25
    assert loss.item() == pytest.approx(-1.25)


def test_policy_loss_seq_mean_aggregation():
    logp, old = _logp([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token-mean: -(1+2+3+4)/4 = -2.5; seq-mean: -(mean(2, 4)) = -3
    tok, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, LossAgg.token_mean)
    seq, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, LossAgg.seq_mean_token_mean)
    assert tok.item() == pytest.approx(-2.5)
    assert seq.item() == pytest.approx(-3.0)


def test_policy_loss_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        policy_loss(
            torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2), torch.ones(2, 3), 0.2, 0.2
        )


# --------------------------------------------------------------------------- KL
def test_kl_penalty_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    # k1 = logp - ref = (ln 2, -ln 2)
    assert_close(kl_penalty(logp, ref, KLEstimator.k1), torch.tensor([[math.log(2), -math.log(2)]]))
    # k3: x = ref - logp = (-ln 2, ln 2) → e^x - x - 1 = (.5 + ln 2 - 1, 2 - ln 2 - 1)
    expected_k3 = torch.tensor([[math.log(2) - 0.5, 1 - math.log(2)]])
    assert_close(kl_penalty(logp, ref, "k3"), expected_k3)
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k2")


def test_kl_k3_nonnegative_zero_at_equal_and_finite():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    assert (kl_penalty(logp, ref, KLEstimator.k3) >= 0).all()
    assert torch.equal(kl_penalty(logp, logp, KLEstimator.k3), torch.zeros(4, 16))
    # x = ref - logp = 100 is clamped to 20: e^20 - 21, finite
    far = kl_penalty(torch.tensor([[-100.0]]), torch.tensor([[0.0]]), KLEstimator.k3)
    assert far.item() == pytest.approx(math.exp(20) - 21, rel=1e-6)
