"""Pair selection from a rollout batch, the prompt stream's data position, prompt files, and
atomic checkpoints of the loop state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actors.core.monitors_history import MonitorHistory
from actors.core.sampling import RolloutBatch
from loop.checkpoint import latest_checkpoint, load_state, save_checkpoint
from loop.pairing import candidate_pairs, plan_pairs
from loop.prompts import PromptError, PromptStream, read_prompt_file
from loop.state import LoopState


def batch(texts: list[str], k: int, ids: list[int | None]) -> RolloutBatch:
    n = len(texts)
    zeros = torch.zeros(n, 1, dtype=torch.long)
    return RolloutBatch(
        prompts=tuple(f"p{i}" for i in range(n // k)),
        prompt_index=torch.arange(n) // k, sample_index=torch.arange(n) % k,
        prompt_ids=zeros, prompt_mask=zeros + 1, response_ids=zeros, response_mask=zeros + 1,
        logprobs=torch.zeros(n, 1), ended=torch.ones(n, dtype=torch.bool), texts=tuple(texts),
        temperature=1.0, top_p=1.0, pad_token_id=0, policy_version=0,
        generation_ids=tuple(ids))


def test_candidates_skip_equal_texts_and_unstored_rows():
    b = batch(["a", "b", "a", "x", "y", "z"], k=3, ids=[10, 11, 12, 13, None, 15])
    # prompt 0: rows 0,1,2 (0 and 2 equal); prompt 1: rows 3,4,5 (row 4 not stored)
    assert candidate_pairs(b) == [(0, 1), (1, 2), (3, 5)]


def test_random_selection_is_seeded_and_capped_per_prompt():
    b = batch([f"t{i}" for i in range(8)], k=4, ids=list(range(100, 108)))
    plan = plan_pairs(b, pairs_per_prompt=2, selection="random", seed=3)
    assert len(plan.comparisons) == 4
    assert all(b.prompt_index[i] == b.prompt_index[j] for i, j in plan.rows)
    assert [(c.generation_a_id, c.generation_b_id) for c in plan.comparisons] == [
        (100 + i, 100 + j) for i, j in plan.rows]
    assert plan == plan_pairs(b, 2, "random", seed=3)
    others = {plan_pairs(b, 2, "random", seed=s).rows for s in range(10)}
    assert len(others) > 1


def test_disagreement_selection_queues_the_most_contested_pair_first():
    b = batch(["a", "b", "c"], k=3, ids=[1, 2, 3])
    # two members; they agree on (0, 1), split on (0, 2) and (1, 2) — most on (1, 2)
    members = torch.tensor([[0.0, 0.0, 3.0],
                            [0.0, 0.0, -1.0]])
    plan = plan_pairs(b, pairs_per_prompt=2, selection="disagreement", seed=0,
                      member_scores=members)
    assert plan.rows == ((1, 2), (0, 2)) or plan.rows == ((0, 2), (1, 2))
    sig = torch.sigmoid
    spread = torch.tensor([sig(torch.tensor(-3.0)), sig(torch.tensor(1.0))]).std(unbiased=False)
    assert plan.comparisons[0].priority == pytest.approx(float(spread), abs=1e-6)
    assert plan.comparisons[0].selection == "ensemble_disagreement"
    assert plan_pairs(b, 1, "disagreement", 0, members).rows[0] in {(0, 2), (1, 2)}
    with pytest.raises(ValueError, match="needs the RM members"):
        plan_pairs(b, 1, "disagreement", 0)


def test_prompt_stream_position_is_the_iteration():
    stream = PromptStream(tuple(f"q{i}" for i in range(5)), seed=1, size=3)
    first_two = stream.batch(0) + stream.batch(1)  # 6 prompts: one shuffle of 5, then 1 more
    assert sorted(first_two[:5]) == [f"q{i}" for i in range(5)]
    assert stream.batch(1) == PromptStream(stream.prompts, 1, 3).batch(1)  # resumable
    assert len(set(stream.batch(0))) == 3  # no repeats inside one shuffle
    many = [p for i in range(10) for p in stream.batch(i)]  # 30 = 6 full shuffles
    assert all(many.count(f"q{i}") == 6 for i in range(5))


def test_prompt_files_name_the_bad_line(tmp_path: Path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hi"}\n\n{"prompt": "there"}\n')
    assert read_prompt_file(good) == ["hi", "there"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": "x"}\n')
    with pytest.raises(PromptError, match=r"bad.jsonl, line 2: expected an object"):
        read_prompt_file(bad)
    with pytest.raises(PromptError, match="no such file"):
        read_prompt_file(tmp_path / "missing.txt")


def test_checkpoints_are_atomic_and_the_latest_complete_one_wins(tmp_path: Path):
    def ppo_ok(directory: Path) -> None:
        directory.mkdir()
        (directory / "weights.bin").write_bytes(b"w")

    state = LoopState(iteration=2, policy_version=2, rm_versions=3, labels_at_refresh=70,
                      history=MonitorHistory())
    first = save_checkpoint(tmp_path, state, serving_rm=3, save_ppo=ppo_ok)
    assert latest_checkpoint(tmp_path) == first and first.name == "it-000002"

    def ppo_dies(directory: Path) -> None:
        directory.mkdir()
        raise KeyboardInterrupt  # killed after some files, before the marker

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, LoopState(iteration=4), serving_rm=3, save_ppo=ppo_dies)
    assert latest_checkpoint(tmp_path) == first  # the partial one is ignored
    restored, serving = load_state(first)
    assert (restored.iteration, restored.policy_version, restored.rm_versions,
            restored.labels_at_refresh, serving) == (2, 2, 3, 70, 3)
    assert json.loads((first / "loop.json").read_text())["iteration"] == 2
    for it in (4, 6, 8):
        save_checkpoint(tmp_path, LoopState(iteration=it), serving_rm=3, save_ppo=ppo_ok)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("it-*"))
    assert kept == ["it-000006", "it-000008"]
