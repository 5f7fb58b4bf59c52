"""The RM trainer group on a GPU: CUDA, NCCL and bf16 (run on a device machine: -m gpu).

The same actor code as on CPU; the group learns real HH pairs in bf16 and scores match a
local bf16 forward of the saved model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from actors.core.hh import load_hh_jsonl
from actors.core.reward_model import RewardModel, encode, load_tokenizer
from actors.reward_trainer import RewardTrainerGroup
from loop.config import ModelSpec, RMConfig

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def test_rm_group_trains_in_bf16_over_nccl(cuda, ray_local, shared_data, tmp_path):
    pairs = load_hh_jsonl(shared_data / "hh-rlhf" / "train.jsonl.gz", limit=64)
    spec = ModelSpec(name="tiny-bert", max_length=96, dtype="bfloat16")
    group = RewardTrainerGroup.launch(1, spec, RMConfig(lr=1e-3, micro_batch_size=8), seed=0,
                                      name_prefix="rm-gpu", num_cpus=1, num_gpus=1)
    try:
        before = group.evaluate(pairs).accuracy
        group.fit(pairs, epochs=3)
        after = group.evaluate(pairs)
        sample = pairs[:4]
        scores = group.score([p.prompt for p in sample], [p.chosen for p in sample])
        group.save(tmp_path / "rm")
    finally:
        group.shutdown()
    assert after.accuracy >= 0.9 and after.accuracy > before
    loaded = RewardModel.load(tmp_path / "rm").cuda()
    assert loaded.head.weight.dtype == torch.bfloat16
    batch = encode(load_tokenizer(tmp_path / "rm"), [p.prompt for p in sample],
                   [p.chosen for p in sample], spec.max_length)
    with torch.no_grad():
        local = loaded(batch.input_ids.cuda(), batch.attention_mask.cuda()).cpu()
    torch.testing.assert_close(local, scores, rtol=2e-2, atol=2e-2)  # bf16
