"""The KL coefficient β of PPO's shaped reward: fixed, or steered toward a target KL.

The adaptive controller is the proportional controller of Ziegler et al. (2019), "Fine-Tuning
Language Models from Human Preferences", §2.2. After a batch of `n_steps` samples whose mean
sequence KL to the reference is KL_t,

    e_t    = clip(KL_t / KL_target − 1, −0.2, 0.2)
    β_t+1  = β_t · (1 + K_β · e_t),     K_β = n_steps / horizon

so β rises while the policy drifts further than the target and falls while it stays closer; the
clip bounds one update to a factor 1 ± 0.2·n_steps/horizon. Both controllers keep their only
state, β, in `state_dict()` so a resumed campaign continues with the β it had.

>>> c = AdaptiveKLController(init_value=0.1, target=6.0, horizon=10000)
>>> c.update(current_kl=8.0, n_steps=256)  # error clipped to +0.2
>>> round(c.value, 9)  # 0.1 · (1 + 0.2 · 256 / 10000)
0.100512
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from loop.config import KLConfig

MAX_PROPORTIONAL_ERROR = 0.2
"""Clip of the relative KL error in one update (Ziegler et al. 2019)."""


@runtime_checkable
class KLController(Protocol):
    """What the PPO trainer needs from a KL controller."""

    value: float
    """The current β."""

    def update(self, current_kl: float, n_steps: int) -> None:
        """Account for a batch of `n_steps` samples whose mean sequence KL was `current_kl`."""
        ...

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume: `{"value": β}`."""
        ...

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore what `state_dict` returned."""
        ...


def _load_value(state: Mapping[str, float], owner: str) -> float:
    if "value" not in state:
        raise KeyError(f"{owner} state needs a 'value' key (the KL coefficient), got "
                       f"keys {sorted(state)}")
    return float(state["value"])


class FixedKLController:
    """A constant β; `update` does nothing.

    Args:
        value: The KL coefficient β ≥ 0.
    """

    def __init__(self, value: float):
        if value < 0:
            raise ValueError(f"the KL coefficient must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: β stays fixed."""

    def state_dict(self) -> dict[str, float]:
        """`{"value": β}`."""
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore β from `state_dict()`."""
        self.value = _load_value(state, "FixedKLController")


class AdaptiveKLController:
    """Target-KL proportional controller of Ziegler et al. (2019).

    Args:
        init_value: Initial β > 0 (the update is multiplicative: β = 0 would never move).
        target: Target KL in nats per sequence, the same unit as `current_kl` of `update`.
        horizon: Samples over which a persistent error changes β by about e^{±0.2}.
    """

    def __init__(self, init_value: float, target: float, horizon: int):
        if init_value <= 0:
            raise ValueError(f"the adaptive KL controller needs an initial coefficient > 0 "
                             f"(it scales β multiplicatively, so β = 0 never moves), got "
                             f"{init_value}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, "
                             f"horizon={horizon}")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """One proportional step: β ← β · (1 + clip(KL/target − 1, ±0.2) · n_steps/horizon).

        Args:
            current_kl: Mean over the batch of the per-sequence KL Σ_t (log π − log π_ref).
            n_steps: Samples (sequences) in that batch.
        """
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        proportional_error = min(max(current_kl / self.target - 1.0, -MAX_PROPORTIONAL_ERROR),
                                 MAX_PROPORTIONAL_ERROR)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, float]:
        """`{"value": β}`; target and horizon come from the config, so a resumed run may change
        them."""
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore β from `state_dict()`."""
        self.value = _load_value(state, "AdaptiveKLController")


def make_kl_controller(cfg: KLConfig) -> KLController:
    """The controller `cfg.controller` names, starting at `cfg.init_coef`.

    Args:
        cfg: The `ppo.kl` section of the campaign config.

    Returns:
        A `FixedKLController` or an `AdaptiveKLController`.
    """
    if cfg.controller == "fixed":
        return FixedKLController(cfg.init_coef)
    if cfg.controller == "adaptive":
        return AdaptiveKLController(cfg.init_coef, cfg.target, cfg.horizon)
    raise ValueError(f"ppo.kl.controller must be 'fixed' or 'adaptive', got {cfg.controller!r}")
