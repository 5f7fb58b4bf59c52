"""The campaign's prompts and its position in them.

Prompts come from `campaign.prompts`: `hh-rlhf` (the prompts of the shipped HH train pairs) or a
file (`.txt`: one prompt per line; `.jsonl`: a `prompt` key per line). Iteration i takes the next
`rollout.prompts_per_iteration` prompts of an epoch-wise seeded shuffle, so the data position is
just the iteration number: a resumed campaign continues with exactly the prompts it would have
used, none skipped and none repeated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.core.hh import load_hh_jsonl
from loop.config import Config
from loop.config_load import ConfigError
from loop.seed import resolve_pairs_path


class PromptError(ConfigError):
    """A prompts file that cannot be used (the message names the file and line)."""


def load_prompts(cfg: Config) -> list[str]:
    """The campaign's prompt list (deduplicated, in file order), at most prompts.max_prompts."""
    source = cfg.campaign.prompts
    if source.source == "hh-rlhf":
        pairs = load_hh_jsonl(resolve_pairs_path("hh-rlhf", "campaign.prompts.source"))
        prompts = [p.prompt for p in pairs]
    else:
        prompts = read_prompt_file(Path(source.path or source.source))
    unique = list(dict.fromkeys(p for p in prompts if p.strip()))
    if not unique:
        raise PromptError(f"campaign.prompts: {source.source!r} holds no prompts")
    return unique[:source.max_prompts]


def read_prompt_file(path: Path) -> list[str]:
    """Prompts of a `.txt` (one per line) or `.jsonl` (`{"prompt": ...}` per line) file."""
    if not path.is_file():
        raise PromptError(f"campaign.prompts: no such file {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PromptError(f"{path}, line {number}: expected an object with a string "
                              f"'prompt', got {line[:80]!r}")
        prompts.append(row["prompt"])
    return prompts


@dataclass(frozen=True)
class PromptStream:
    """Deterministic prompt batches: batch(i) depends only on (prompts, seed, size, i)."""

    prompts: tuple[str, ...]
    seed: int
    size: int

    def batch(self, iteration: int) -> list[str]:
        """The prompts of iteration `iteration` (0-based), wrapping into new shuffles."""
        n = len(self.prompts)
        out = []
        for k in range(iteration * self.size, (iteration + 1) * self.size):
            epoch, offset = divmod(k, n)
            order = np.random.default_rng([self.seed, epoch, 3]).permutation(n)
            out.append(self.prompts[int(order[offset])])
        return out
