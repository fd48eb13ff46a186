"""RL math of the project: group advantages, per-token log-probs/entropy, losses, KL.

Pure tensor functions (shapes in each docstring); see `advantages` and `losses`.
"""

from npo.algo.advantages import (
    compute_advantages,
    drgrpo_advantages,
    grpo_advantages,
    register_adv_estimator,
    zero_variance_fraction,
)
from npo.algo.autonpo import (
    RollbackChoice,
    TriggerSignals,
    choose_rollback,
    cooldown_ok,
    detect_stagnation,
    ema,
    mean_token_kl,
    q_hat_from_pool,
)
from npo.algo.losses import (
    agg_loss,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    token_logprobs,
)
from npo.algo.npo import (
    guidance_gate,
    luffy_shaped_loss,
    mix_group_rewards,
    offpolicy_stats,
    old_logprobs_for_mix,
    pass_rates,
)

__all__ = [
    "RollbackChoice",
    "TriggerSignals",
    "agg_loss",
    "choose_rollback",
    "compute_advantages",
    "cooldown_ok",
    "detect_stagnation",
    "drgrpo_advantages",
    "ema",
    "entropy_from_logits",
    "grpo_advantages",
    "guidance_gate",
    "kl_penalty",
    "luffy_shaped_loss",
    "mean_token_kl",
    "mix_group_rewards",
    "offpolicy_stats",
    "old_logprobs_for_mix",
    "pass_rates",
    "policy_loss",
    "q_hat_from_pool",
    "register_adv_estimator",
    "token_logprobs",
    "zero_variance_fraction",
]
