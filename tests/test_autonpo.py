"""Hand-checked numbers for npo.algo.autonpo: EMA, the stagnation trigger, Q̂, V̂, the
rollback choice, cooldown.

Run: .venv/bin/python -m pytest tests/test_autonpo.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from npo.algo import (
    RollbackChoice,
    TriggerSignals,
    choose_rollback,
    cooldown_ok,
    detect_stagnation,
    ema,
    mean_token_kl,
    q_hat_from_pool,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- EMA
def test_ema_hand_values():
    assert ema([1.0, 0.0, 0.0], 0.5) == pytest.approx([1.0, 0.5, 0.25])
    # 0, .25·1 = .25, .25 + .75·.25 = .4375, .25 + .75·.4375 = .578125
    assert ema([0, 1, 1, 1], 0.25) == pytest.approx([0.0, 0.25, 0.4375, 0.578125])
    assert ema([3.0, 7.0], 1.0) == [3.0, 7.0]  # alpha 1: no smoothing
    assert ema([], 0.3) == []


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_ema_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ema([1.0], alpha)


# --------------------------------------------------------------------------- trigger
def _detect(rewards, entropies, window=5, alpha=0.5, gain=0.01, drop=0.05) -> TriggerSignals:
    return detect_stagnation(rewards, entropies, window, alpha, gain, drop)


FALLING_ENTROPY = [1.0] * 5 + [0.8] * 5  # last window 20% below the one before


def test_flat_reward_and_falling_entropy_triggers():
    got = _detect([0.5] * 10, FALLING_ENTROPY)
    assert got.triggered
    assert got.reward_ema_gain == 0.0
    assert got.entropy_change == pytest.approx(-0.2)
    assert got.window == 5
    assert "-20.0%" in got.reason and "stagnant" in got.reason and "triggered" in got.reason


def test_rising_reward_does_not_trigger():
    # ramp 0, .1, ..., .9: the EMA gains about window·slope = .5 over the last window
    got = _detect([i / 10 for i in range(10)], FALLING_ENTROPY)
    assert not got.triggered
    assert got.reward_ema_gain > 0.4
    assert got.entropy_change == pytest.approx(-0.2)  # entropy alone is not enough
    assert "improving" in got.reason


def test_flat_reward_and_flat_entropy_does_not_trigger():
    got = _detect([0.5] * 10, [1.0] * 10)
    assert not got.triggered
    assert got.entropy_change == 0.0
    assert "not declining" in got.reason


def test_entropy_drop_below_threshold_does_not_trigger():
    got = _detect([0.5] * 10, [1.0] * 5 + [0.96] * 5)  # -4% < 5% required
    assert not got.triggered
    assert got.entropy_change == pytest.approx(-0.04)


def test_short_history_does_not_trigger():
    got = _detect([0.5] * 9, [1.0] * 4 + [0.1] * 5)
    assert not got.triggered
    assert math.isnan(got.reward_ema_gain) and math.isnan(got.entropy_change)
    assert got.reason.startswith("not enough history")


def test_reward_ema_gain_hand_value_and_strict_boundary():
    # alpha .5 on [0, 0, 0, 0, 1, 1]: EMA 0, 0, 0, 0, .5, .75 -> gain over 2 steps = .75 - 0;
    # entropy: last 2 (.5) vs the 2 before (1) = -50%, declining, so the reward test decides
    rewards, entropies = [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 0.5, 0.5]
    at = detect_stagnation(rewards, entropies, 2, 0.5, 0.75, 0.05)
    assert at.reward_ema_gain == 0.75
    assert at.entropy_change == pytest.approx(-0.5)
    assert not at.triggered  # gain == min_reward_gain is not stagnation (strict <)
    assert "improving" in at.reason
    assert detect_stagnation(rewards, entropies, 2, 0.5, 0.76, 0.05).triggered
    # alpha 1 (raw rewards): [0]*5 + [.5]*5, window 5 -> gain .5 - 0
    raw = detect_stagnation([0] * 5 + [0.5] * 5, FALLING_ENTROPY, 5, 1.0, 0.5, 0.05)
    assert raw.reward_ema_gain == 0.5


def test_detect_stagnation_errors():
    with pytest.raises(ValueError, match="one value per step"):
        _detect([0.5] * 10, [1.0] * 9)
    with pytest.raises(ValueError, match="window"):
        _detect([0.5] * 10, [1.0] * 10, window=0)


# --------------------------------------------------------------------------- rollback choice
def test_choose_rollback_interior_optimum():
    # Q = 1 - exp(-Δ/4), V = .01·exp(Δ/4) -> S = 100·(e^{-Δ/4} - e^{-Δ/2}), max at Δ = 4·ln 2
    # S(1) = 100(.7788 - .6065) = 17.23, S(2) = 100(.6065 - .3679) = 23.87,
    # S(4) = 100(.3679 - .1353) = 23.25, S(8) = 11.70, S(16) = 1.80  -> Δ* = 2
    deltas = [1, 2, 4, 8, 16]
    q = {d: 1 - math.exp(-d / 4) for d in deltas}
    v = {d: 0.01 * math.exp(d / 4) for d in deltas}
    got = choose_rollback([16, 4, 1, 8, 2], q, v)
    assert isinstance(got, RollbackChoice)
    assert got.delta == 2
    assert [row["delta"] for row in got.table] == deltas  # sorted
    s = [row["s"] for row in got.table]
    assert s == pytest.approx([17.227, 23.865, 23.254, 11.702, 1.798], abs=1e-3)
    assert [row["reason"] for row in got.table] == ["ok", "chosen", "ok", "ok", "ok"]
    assert got.table[1] == {"delta": 2, "q": q[2], "v": v[2], "s": s[1], "reason": "chosen"}


def test_choose_rollback_floor_for_zero_variance():
    # V(1) = 0 -> S = .2 / 1e-6 beats S(2) = .5 / 1 ; the table keeps the measured v
    got = choose_rollback([1, 2], {1: 0.2, 2: 0.5}, {1: 0.0, 2: 1.0})
    assert got.delta == 1
    assert got.table[0]["v"] == 0.0 and got.table[0]["s"] == pytest.approx(2e5)
    assert [row["reason"] for row in got.table] == ["chosen (floored)", "ok"]
    # a larger floor flips it: .2 / .5 = .4 < .5
    assert choose_rollback([1, 2], {1: 0.2, 2: 0.5}, {1: 0.0, 2: 1.0}, v_floor=0.5).delta == 2


def test_the_default_floor_leaves_small_measured_variances_to_pick():
    """Checkpoints a few steps apart at a small learning rate differ by V̂ ~ 1e-4: S must
    weigh them (Δ = 10: .3 / 2e-4 = 1500 beats .5 / 5e-4 and .6 / 9e-4), where the old
    floor of 1e-3 made every S = Q̂ / 1e-3 and so picked the largest Q̂ (Δ = 40)."""
    q, v = {10: 0.3, 20: 0.5, 40: 0.6}, {10: 2e-4, 20: 5e-4, 40: 9e-4}
    got = choose_rollback([10, 20, 40], q, v)
    assert got.delta == 10
    assert [row["reason"] for row in got.table] == ["chosen", "ok", "ok"]
    assert choose_rollback([10, 20, 40], q, v, v_floor=1e-3).delta == 40


def test_choose_rollback_tie_prefers_nearer_checkpoint():
    # S(2) = .4 / .1 = 4.0 = .8 / .2 = S(4)
    got = choose_rollback([4, 2], {2: 0.4, 4: 0.8}, {2: 0.1, 4: 0.2})
    assert got.table[0]["s"] == got.table[1]["s"] == 4.0
    assert got.delta == 2


def test_choose_rollback_skips_candidates_without_data():
    # 1 lacks V̂, 3 lacks Q̂, 4 has a nan Q̂: only 2 is scored
    got = choose_rollback([1, 2, 3, 4], {1: 0.9, 2: 0.1, 4: math.nan}, {2: 1.0, 3: 0.01, 4: 1.0})
    assert got.delta == 2
    reasons = {row["delta"]: row["reason"] for row in got.table}
    assert reasons == {1: "no data", 2: "chosen", 3: "no data", 4: "no data"}
    assert math.isnan(got.table[0]["s"])


def test_choose_rollback_errors():
    with pytest.raises(ValueError, match=r"candidates \[1, 2\]"):
        choose_rollback([2, 1], {1: 0.5}, {2: 0.1})
    with pytest.raises(ValueError, match=r"candidates \[\]"):
        choose_rollback([], {}, {})
    with pytest.raises(ValueError, match=">= 1"):
        choose_rollback([0, 1], {0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0})
    with pytest.raises(ValueError, match="v_floor"):
        choose_rollback([1], {1: 1.0}, {1: 1.0}, v_floor=0.0)


# --------------------------------------------------------------------------- V̂ and Q̂
def test_mean_token_kl_zero_when_equal():
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.9]]))
    assert mean_token_kl(logp, logp.clone(), torch.ones(1, 3)) == 0.0


def test_mean_token_kl_hand_value():
    # x = +ln2: k3 = 2 - ln2 - 1 = .30685; x = -ln2: k3 = .5 + ln2 - 1 = .19315; mean = .25
    # third token masked (garbage past log-prob -1e9 would give a huge k3)
    current = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    past = torch.tensor([[-1.0 + math.log(2), -1.0 - math.log(2), -1e9]])
    got = mean_token_kl(current, past, torch.tensor([[1, 1, 0]]))
    assert isinstance(got, float)
    assert got == pytest.approx(0.25, abs=1e-6)
    # direction matters: KL(current || past) with x = past - current = +ln2 -> 1 - ln2
    one = mean_token_kl(current[:, :1], past[:, :1], torch.ones(1, 1))
    assert one == pytest.approx(1 - math.log(2), abs=1e-6)  # .30685, not .19315
    assert mean_token_kl(current, past, torch.zeros(1, 3)) == 0.0  # empty mask
    with pytest.raises(ValueError, match="mask"):
        mean_token_kl(current, past, torch.ones(1, 2))


def test_q_hat_from_pool_hand_example():
    current_pass = {"a": 1.0, "b": 0.5, "c": 0.25, "e": 0.0}
    pool = {9: ["a", "b"], 8: ["c", "d"], 6: ["e"], 5: ["z"], 2: ["a", "a", "e"]}
    got = q_hat_from_pool(current_pass, pool, t=10, candidates=[1, 2, 3, 4, 5, 8])
    # Δ1 -> step 9: (1 + .5)/2 = .75; Δ2 -> step 8: c only (d unmeasured) = .25;
    # Δ3 -> step 7: no pool entry, omitted; Δ4 -> step 6: e = 0.0 (a measured 0 counts);
    # Δ5 -> step 5: z unmeasured, omitted; Δ8 -> step 2: a once, e: (1 + 0)/2 = .5 (not 2/3)
    assert got == {1: 0.75, 2: 0.25, 4: 0.0, 8: 0.5}


# --------------------------------------------------------------------------- cooldown
def test_cooldown_ok():
    assert cooldown_ok(None, 0, 100)  # never intervened
    assert cooldown_ok(10, 15, 5)  # exactly `cooldown` steps later
    assert not cooldown_ok(10, 14, 5)
    assert not cooldown_ok(10, 4, 5)  # policy step rewound by a rollback
    assert cooldown_ok(10, 10, 0)
    with pytest.raises(ValueError, match="cooldown"):
        cooldown_ok(None, 0, -1)
