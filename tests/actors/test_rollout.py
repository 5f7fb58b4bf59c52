"""Rollout workers on Ray: weights through the object store, sharded sampling, ledger rows.

Two tiny-GPT-2 workers (0.5 CPU each, one torch thread) on the session's 2-CPU Ray. The driver
computes in its own process with its own thread count, so worker-vs-driver logits are compared
to 1e-5; two workers with the same weights and threads agree bit for bit.
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import ray
import torch
from sqlalchemy import select

from actors.core.policy import load_policy
from actors.core.sampling import encode_prompts, recompute_logprobs
from actors.core.weight_transport import pack_state
from actors.rollout import RolloutGroup, shard_seed
from loop.config import ModelSpec, RolloutConfig
from storage.ledger import Ledger
from storage.models import Generation

SPEC = ModelSpec(name="tiny-gpt2", max_length=64)
CFG = RolloutConfig(workers=2, samples_per_prompt=2, max_new_tokens=6, temperature=0.8)
CAMPAIGN = "rollout-test"
PROMPTS = ["\n\nHuman: What is the capital of France?\n\nAssistant:", "Name a color.",
           "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: tell me a joke\n\nAssistant:",
           "Why is the sky blue?", "Count to three."]


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite'}")  # the driver migrates
    ledger.ensure_campaign(CAMPAIGN)
    return ledger


@pytest.fixture
def launch(ray_local, request):
    """Start groups with test-unique actor names; kill them when the test ends."""
    groups: list[RolloutGroup] = []
    counter = itertools.count()

    def _launch(workers: int, **kwargs) -> RolloutGroup:
        group = RolloutGroup.launch(workers, SPEC, CFG, seed=0, num_cpus=0.5,
                                    name_prefix=f"rollout-{request.node.name}-{next(counter)}",
                                    **kwargs)
        groups.append(group)
        return group

    yield _launch
    for group in groups:
        group.shutdown()


@pytest.fixture(scope="module")
def fixed_input():
    _, tokenizer = load_policy("tiny-gpt2", seed=0)
    ids, _ = encode_prompts(tokenizer, ["A fixed input for every worker."])
    return ids, torch.ones_like(ids)


def driver_logits(model, fixed_input) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=fixed_input[0], attention_mask=fixed_input[1]).logits


def test_after_publish_every_worker_has_the_new_version_and_the_drivers_logits(
        launch, fixed_input):
    group = launch(2)
    v0, _ = load_policy("tiny-gpt2", seed=0)  # what the workers load as version 0
    v1, _ = load_policy("tiny-gpt2", seed=1)  # "trained" weights: another init
    assert group.versions() == [0, 0]
    before = group.logits(*fixed_input)
    torch.testing.assert_close(before[0], driver_logits(v0, fixed_input), rtol=1e-5, atol=1e-5)

    ref = group.publish(1, v1.state_dict())
    assert isinstance(ref, ray.ObjectRef) and group.versions() == [1, 1]
    after = group.logits(*fixed_input)
    assert torch.equal(after[0], after[1])  # same weights, same threads: bitwise
    expected = driver_logits(v1, fixed_input)
    torch.testing.assert_close(after[0], expected, rtol=1e-5, atol=1e-5)
    assert (after[0] - before[0]).abs().max() > 0.1  # the weights really changed

    v2 = {k: v * 1.01 if v.is_floating_point() else v for k, v in v1.state_dict().items()}
    group.publish(2, ray.put(pack_state(v2)))  # a ref a trainer already put
    assert group.versions() == [2, 2]
    with pytest.raises(ray.exceptions.RayTaskError, match="older than the loaded version 2"):
        group.publish(1, ref)
    assert group.versions() == [2, 2]


def test_generations_land_in_the_ledger_with_their_policy_version(launch, ledger):
    group = launch(2, ledger_url=ledger.url, campaign=CAMPAIGN)
    v1, _ = load_policy("tiny-gpt2", seed=1)
    group.publish(1, v1.state_dict())
    refs = group.generate(PROMPTS, seed=7)
    assert len(refs) == 2 and all(isinstance(r, ray.ObjectRef) for r in refs)
    shards = ray.get(refs)
    assert [s.prompts for s in shards] == [tuple(PROMPTS[:3]), tuple(PROMPTS[3:])]
    batch = RolloutGroup.collect(refs)
    assert batch.num_rows == 10 and batch.policy_version == 1 and batch.worker is None
    assert batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # the worker sampled with v1: its logprobs are v1's, recomputed here
    torch.testing.assert_close(recompute_logprobs(v1, batch), batch.logprobs, rtol=0, atol=1e-5)
    assert ledger.generations_per_policy_version(CAMPAIGN) == {1: 10}
    with ledger.engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(Generation))}
    assert sorted(rows) == sorted(batch.generation_ids)
    prompt_ids = ledger.add_prompts(CAMPAIGN, PROMPTS)  # idempotent: the ids the workers made
    for i, gid in enumerate(batch.generation_ids):
        row, shard = rows[gid], i // 6  # worker 0 had prompts 0-2 (6 rows), worker 1 the rest
        assert (row.text, row.policy_version, row.worker) == (
            batch.texts[i], 1, group_name(shards[shard]))
        assert row.prompt_id == prompt_ids[batch.prompt_index[i]]
        assert row.sample_index == batch.sample_index[i]
        assert row.token_count == batch.response_mask[i].sum() == 6
        assert row.sampling_params == {"temperature": 0.8, "top_p": 1.0, "max_new_tokens": 6,
                                       "seed": shard_seed(7, shard)}

    # A retried call (same seed, same version) writes nothing new: same texts, same ids
    again = RolloutGroup.collect(group.generate(PROMPTS, seed=7))
    assert again.texts == batch.texts and again.generation_ids == batch.generation_ids
    # A second rollout of the same prompts at the same version needs its own sample indices
    more = RolloutGroup.collect(group.generate(PROMPTS, seed=8, sample_offset=2))
    assert more.texts != batch.texts
    assert ledger.generations_per_policy_version(CAMPAIGN) == {1: 20}


def group_name(batch) -> str:
    assert batch.worker is not None
    return batch.worker


def test_one_worker_and_a_prompt_given_twice(launch, ledger):
    group = launch(1, ledger_url=ledger.url, campaign=CAMPAIGN)
    prompts = [PROMPTS[1], PROMPTS[1]]  # the same prompt twice: sample indices 0-1, then 2-3
    batch = RolloutGroup.collect(group.generate(prompts, seed=3))
    assert batch.policy_version == 0 and batch.worker.endswith("-0")
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(Generation.sample_index, Generation.prompt_id)
                            .order_by(Generation.id)).all()
    assert [r.sample_index for r in rows] == [0, 1, 2, 3] and len({r.prompt_id for r in rows}) == 1
    assert len(set(batch.generation_ids)) == 4
