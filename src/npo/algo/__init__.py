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
from npo.algo.losses import (
    agg_loss,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    token_logprobs,
)

__all__ = [
    "agg_loss",
    "compute_advantages",
    "drgrpo_advantages",
    "entropy_from_logits",
    "grpo_advantages",
    "kl_penalty",
    "policy_loss",
    "register_adv_estimator",
    "token_logprobs",
    "zero_variance_fraction",
]
