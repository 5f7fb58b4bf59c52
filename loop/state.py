"""The driver's own state between iterations: small, JSON-serialisable, checkpointed."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.core.monitors_history import MonitorHistory


@dataclass
class LoopState:
    """What the loop carries from one iteration to the next (and checkpoints).

    Attributes:
        iteration: Iterations completed (the data position).
        policy_version: Version of the policy the rollout workers hold.
        rm_versions: The highest RM version number used so far (the next refresh trains the
            one after; versions a stopped run recorded after its last checkpoint count).
        rm_refreshes: RM refreshes this campaign's checkpointed history ran, the first RM
            counting as 1: the next refresh is number `rm_refreshes + 1`, which seeds it.
        labels_at_refresh: Ledger watermark when the serving RM was last refreshed.
        history: Monitor history (windowed summaries).
        pause_ppo: Iterations left whose PPO update an alarm skips (`monitors.action`).
        force_rm_refresh: An alarm asked for an RM refresh at the next iteration with labels.
        last_kl: Mean KL of the last PPO update (what the monitors see while PPO is paused).
    """

    iteration: int = 0
    policy_version: int = 0
    rm_versions: int = 1
    rm_refreshes: int = 1
    labels_at_refresh: int = 0
    history: MonitorHistory = field(default_factory=MonitorHistory)
    pause_ppo: int = 0
    force_rm_refresh: bool = False
    last_kl: float = 0.0
