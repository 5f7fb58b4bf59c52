"""Data-parallel plumbing shared by the DeepSpeed actors: rendezvous, DeepSpeed config, sharding.

Each rank of a group is its own Ray actor process. The driver asks rank 0 for a free port, then
every rank sets the five torch.distributed variables itself and joins a gloo group (NCCL on GPUs
is a later change of `backend`), all ranks at once.

Sharding is by global batch: every epoch one seeded permutation of the data is shared by all
ranks, rank r takes positions r, r+W, r+2W, … of it, and step k uses the k-th run of
`micro_batch` items of that shard. Step k of the group therefore covers exactly positions
[k·W·B, (k+1)·W·B) of the permutation, whatever W is — so 1 rank × micro-batch 2B and 2 ranks ×
micro-batch B train on the same global batches.

>>> p = epoch_permutation(8, seed=0, epoch=0)
>>> epoch_batches(8, world_size=2, rank=1, micro_batch=2, seed=0, epoch=0) == [
...     [p[1], p[3]], [p[5], p[7]]]
True
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def set_dist_env(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for torch.distributed.

    LOCAL_RANK is 0: on CPU no rank owns a device, and Ray may place ranks on different nodes.
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))


def deepspeed_config(micro_batch_size: int, zero_stage: int, bf16: bool,
                     max_grad_norm: float) -> dict[str, Any]:
    """The DeepSpeed config of one engine: no gradient accumulation, clipped gradients."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": max_grad_norm,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The shared shuffle of epoch `epoch`: a permutation of range(n) seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def epoch_batches(n: int, world_size: int, rank: int, micro_batch: int, seed: int,
                  epoch: int, lengths: Sequence[int] | None = None,
                  window: int = 0) -> list[list[int]]:
    """Item indices of this rank's micro-batches in one epoch.

    The epoch's shuffle (`epoch_permutation`) is cut into global batches of G = W · B items;
    rank r takes items r, r + W, … of each, so the global batches — and hence the updates — are
    the same for any W with the same G. Every rank gets the same number of steps, n // G: the
    incomplete last global batch is dropped, so all ranks take part in every collective.

    Length grouping (`lengths` given, `window` ≥ 2): the shuffle is split into spans of
    `window` global batches; each span is sorted by length before it is cut, and the global
    batches are then put in a seeded random order. Batches then hold inputs of similar length,
    so little of each padded batch is padding, while which items meet in a batch, and the order
    of batches, stay random from epoch to epoch.

    Args:
        n: Items in the data set.
        world_size: Ranks W.
        rank: This rank, in [0, W).
        micro_batch: Items per rank per step B.
        seed: Run seed.
        epoch: Epoch number (a new shuffle each epoch).
        lengths: Optional `n` input lengths (tokens) for length grouping.
        window: Global batches per sorted span (0 or 1: no grouping).

    Returns:
        `steps` lists of `B` indices.
    """
    size = world_size * micro_batch
    steps = n // size
    used = epoch_permutation(n, seed, epoch)[:steps * size]
    if lengths is not None and window >= 2:
        if len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for {n} items")
        span = window * size
        spans = [sorted(used[s:s + span], key=lambda i: (lengths[i], i))
                 for s in range(0, len(used), span)]
        batches = [part[k:k + size] for part in spans for k in range(0, len(part), size)]
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(batches)).tolist()
        used = [i for b in order for i in batches[b]]
    return [used[k * size:(k + 1) * size][rank::world_size] for k in range(steps)]


def rank_chunk(n: int, world_size: int, rank: int) -> range:
    """This rank's contiguous share of n items for inference: ceil(n / W) items (fewer at the
    end, possibly none)."""
    size = -(-n // world_size)
    return range(min(rank * size, n), min((rank + 1) * size, n))
