"""Group-relative advantage estimators, chosen by name through a small registry.

Each estimator maps verifier rewards of N prompts x G responses, `[N, G]`, to one scalar
advantage per response, `[N, G]`; the trainer broadcasts it to every response token.

- `grpo`: A_i = (r_i - mean(r)) / (std(r) + eps), GRPO (arXiv 2402.03300, sec. 4.1.2).
  std is the unbiased sample std (Bessel's correction, torch.std's default), as widely used
  GRPO code computes it; the paper does not say which.
- `drgrpo`: A_i = r_i - mean(r), Dr.GRPO (arXiv 2503.20783): no std normalisation, which
  removes the bias towards groups with small reward spread.

A group whose rewards are all equal gets A = 0 for every response (no learning signal);
`zero_variance_fraction` measures how much of a batch that is, the signal NPO's guide
trajectory is meant to restore. Add an estimator with `@register_adv_estimator(name)` and a
member of `npo.config.AdvEstimator`; callers go through `compute_advantages`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from npo.config import AdvEstimator

AdvFn = Callable[[Tensor, float], Tensor]
_ADV_ESTIMATORS: dict[str, AdvFn] = {}


def register_adv_estimator(name: AdvEstimator | str) -> Callable[[AdvFn], AdvFn]:
    """Decorator: register `fn(rewards [N, G], eps) -> [N, G]` under `name`."""
    key = str(name)

    def decorate(fn: AdvFn) -> AdvFn:
        if key in _ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {key!r} is already registered")
        _ADV_ESTIMATORS[key] = fn
        return fn

    return decorate


def compute_advantages(name: AdvEstimator | str, rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Advantages of the estimator registered as `name`.

    rewards: [N, G] (N prompts, G responses each) -> advantages [N, G], float.
    Raises ValueError for a name nobody registered.
    """
    fn = _ADV_ESTIMATORS.get(str(name))
    if fn is None:
        raise ValueError(
            f"unknown advantage estimator {str(name)!r}; known: {sorted(_ADV_ESTIMATORS)}"
        )
    return fn(_as_groups(rewards), eps)


def _as_groups(rewards: Tensor) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    # Verifier rewards may arrive as ints or bools; the statistics need floats.
    return rewards if rewards.is_floating_point() else rewards.float()


@register_adv_estimator(AdvEstimator.grpo)
def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO: (r - mean_g) / (std_g + eps) within each group, std unbiased.

    rewards: [N, G] with G >= 2 -> [N, G]. A group of equal rewards gives exactly 0.
    """
    r = _as_groups(rewards)
    if r.shape[1] < 2:
        raise ValueError("grpo advantages need G >= 2 responses per group (unbiased std)")
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)  # unbiased (divides by G - 1)
    return (r - mean) / (std + eps)


@register_adv_estimator(AdvEstimator.drgrpo)
def drgrpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Dr.GRPO: r - mean_g within each group; `eps` is unused (kept for the registry).

    rewards: [N, G] -> [N, G].
    """
    r = _as_groups(rewards)
    return r - r.mean(dim=1, keepdim=True)


def zero_variance_fraction(rewards: Tensor) -> float:
    """Share of groups whose rewards are all equal (no advantage signal); 0.0 when N = 0.

    rewards: [N, G] -> python float in [0, 1].
    """
    r = _as_groups(rewards)
    if r.shape[0] == 0:
        return 0.0
    return (r == r[:, :1]).all(dim=1).float().mean().item()


__all__ = [
    "AdvFn",
    "compute_advantages",
    "drgrpo_advantages",
    "grpo_advantages",
    "register_adv_estimator",
    "zero_variance_fraction",
]
