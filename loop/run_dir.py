"""The run directory of a campaign: where its resolved config, metrics, checkpoints and (by
default) its SQLite ledger and weight store live."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from loop.config import Config
from loop.config_load import ConfigError

CONFIG_FILE = "config.yaml"
EXTENDABLE = {"campaign.iterations"}  # a resumed campaign may run longer (or stop sooner)
RELOCATABLE = {"resources.placement_strategy", "resources.placement_timeout_s"}
"""Keys a resumed campaign may change: where its actors run, not what they compute."""
OBSERVABLE = "metrics."
"""A resumed campaign may also change how it reports (progress, sinks), not what it computes."""


def resolve_run_dir(cfg: Config) -> Path:
    """`campaign.run_dir`, else $PREFLOOP_RUN_DIR, else `runs/<campaign.name>`."""
    if cfg.campaign.run_dir:
        return Path(cfg.campaign.run_dir)
    if os.environ.get("PREFLOOP_RUN_DIR"):
        return Path(os.environ["PREFLOOP_RUN_DIR"])
    return Path("runs") / cfg.campaign.name


def auto_resume_dir(cfg: Config) -> Path | None:
    """`--auto-resume`: the run directory of `cfg` when it holds a campaign, None when it does
    not (start the campaign there).

    This is what makes a resubmitted job continue: the same command finds the directory the
    first submission created. A campaign there that `cfg` may not continue (see
    `prepare_run_dir`) is a `ConfigError` naming the keys that differ.
    """
    run_dir = resolve_run_dir(cfg)
    if not (run_dir / CONFIG_FILE).is_file():
        return None
    _check_resumable(cfg, run_dir, "--auto-resume")
    return run_dir


def prepare_run_dir(cfg: Config, resume: Path | None) -> Path:
    """Create (or, with `resume`, reopen) the run directory and pin its resolved config.

    A resumed campaign must run the config it started with: any difference is an error that
    names the keys, so a resubmitted job never silently changes course — except
    `campaign.iterations`, which extends (or shortens) the campaign, and the placement keys
    (`RELOCATABLE`); both are re-pinned.
    """
    run_dir = resume if resume is not None else resolve_run_dir(cfg)
    saved_path = run_dir / CONFIG_FILE
    resolved = cfg.model_dump(mode="json")
    if resume is not None:
        if _check_resumable(cfg, run_dir, "--resume") != resolved:
            _pin(saved_path, resolved)
        return run_dir
    if saved_path.exists():
        raise ConfigError(f"{run_dir} already holds a campaign: continue it with --resume "
                          f"{run_dir}, or pick another campaign.name or campaign.run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    _pin(saved_path, resolved)
    return run_dir


def _check_resumable(cfg: Config, run_dir: Path, flag: str) -> dict:
    """The config pinned in `run_dir`; a `ConfigError` (naming `flag`, the option that asked
    for the resume) when there is none or `cfg` differs from it beyond what may change."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise ConfigError(f"{flag} {run_dir}: no {CONFIG_FILE} there; not a run directory")
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    changed = sorted(k for k in _diff_keys(saved, cfg.model_dump(mode="json"))
                     if k not in EXTENDABLE | RELOCATABLE and not k.startswith(OBSERVABLE))
    if changed:
        raise ConfigError(f"{flag} {run_dir}: the config differs from the one the campaign "
                          f"started with at: {', '.join(changed)}")
    return saved


def _pin(path: Path, resolved: dict) -> None:
    """Write the resolved config atomically (write, then rename)."""
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def _diff_keys(a: object, b: object, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ. Only keys both sides hold are compared: a key the
    pinned config lacks was added to prefloop after the campaign started (it ran with that
    key's default behaviour), and one the current schema lacks was removed since."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) & set(b)
        return set().union(*(_diff_keys(a[k], b[k], f"{prefix}{k}.") for k in keys))
    return set() if a == b else {prefix.rstrip(".")}
