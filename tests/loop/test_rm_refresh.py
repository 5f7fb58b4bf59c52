"""RM refreshes through `RMService`: warm starts, fresh + replay training sets, the promotion
gate rejecting a corrupted candidate, and provenance in the ledger. Real Ray, real DeepSpeed,
a real SQLite ledger and weight store; the random tiny-bert backbone on a preference a small
model learns in a few epochs (the preferred reply carries a word the other lacks)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray
import torch

from actors.core.hh import PreferencePair
from actors.core.refresh_split import older_trainable, split_refresh
from actors.core.weight_transport import pack_state, unpack_state
from loop.config_load import load_config
from loop.rm_refresh import RMService, ServingRM
from loop.seed import seed_pairs
from storage.ledger import Ledger

OVERRIDES = ["campaign.name=gate", "rm.seed_pairs=null", "rm.eval_max_pairs=16",
             "rm.lr=0.001", "rm.epochs=4", "rm.micro_batch_size=8", "rm.fresh_eval_fraction=0.3",
             "rm.replay_fraction=0.5", "rm.promotion_min_pairs=12"]


def synthetic_pairs(start: int, n: int) -> list[PreferencePair]:
    topics = ["rain", "bread", "maps", "tea", "bikes", "stars", "clay", "boats"]
    return [PreferencePair(f"Human: tell me about {topics[i % 8]} {i}\n\nAssistant:",
                           f"gladly, here is a careful answer about {topics[i % 8]}",
                           f"no about {topics[i % 8]}")
            for i in range(start, start + n)]


class CorruptingService(RMService):
    """Trains the candidate, then (while `corrupt`) swaps in the serving weights with the
    reward head negated: a candidate that orders every pair backwards."""

    corrupt = True

    def _train_candidate(self, group, pairs, version, refresh):
        fit = super()._train_candidate(group, pairs, version, refresh)
        if not self.corrupt or self.serving is None:
            return fit
        state = unpack_state(ray.get(self.serving.weights))
        state = {k: (-v if k.startswith("head") else v) for k, v in state.items()}
        group.load_state(ray.put(pack_state(state)))
        return fit


def test_gate_rejects_a_corrupted_candidate_and_keeps_serving_the_old_rm(ray_local, tmp_path):
    cfg = load_config("configs/tiny.yaml", [*OVERRIDES, f"campaign.run_dir={tmp_path}"])
    ledger = Ledger.open(f"sqlite:///{tmp_path}/ledger.sqlite")
    ledger.ensure_campaign("gate")
    lines: list[str] = []
    seed_pairs(ledger, "gate", synthetic_pairs(0, 64), source="synthetic-1")
    service = CorruptingService(cfg, ledger, tmp_path, lines.append)
    try:
        first = service.refresh(ledger.snapshot("gate"), version=1)
        assert first.promoted and first.metrics["rm/train_fresh"] == 64
        assert first.metrics["rm/reference_accuracy"] >= 0.0  # HH holdout: measured, not gated
        v1_weights = service.serving.weights

        seed_pairs(ledger, "gate", synthetic_pairs(64, 96), source="synthetic-2")  # fresh labels
        snap = ledger.snapshot("gate")
        second = service.refresh(snap, version=2)
        m = second.metrics
        held = int(m["rm/fresh_eval_pairs"])
        assert 12 <= held <= 50 and m["rm/train_fresh"] == 96 - held
        assert m["rm/train_replay"] == m["rm/train_fresh"]  # replay_fraction 0.5
        assert m["rm/fresh_accuracy_serving"] >= 0.9  # v1 learned the preference
        assert m["rm/fresh_accuracy"] <= 0.1  # the corrupted candidate orders them backwards
        assert not second.promoted and second.reason.startswith("worse: accuracy")
        assert service.serving.version == 1 and service.serving.weights == v1_weights

        service.corrupt = False  # an honest candidate this time
        honest = service.refresh(snap, version=3)
        assert honest.promoted and service.serving.version == 3
        # v3 warm-started from v1 (not from the rejected v2): same serving score on the same
        # held-out fresh pairs
        assert honest.metrics["rm/fresh_accuracy_serving"] == m["rm/fresh_accuracy_serving"]
        assert honest.metrics["rm/fresh_accuracy"] >= m["rm/fresh_accuracy_serving"] - 1e-9
    finally:
        service.shutdown()

    rows = {v.version: v for v in ledger.model_versions("gate", "rm")}
    assert {v: r.status for v, r in rows.items()} == {1: "promoted", 2: "rejected",
                                                       3: "promoted"}
    assert rows[2].parent_version == 1 and rows[3].parent_version == 1
    assert rows[3].snapshot.sha256 == snap.sha256
    assert ledger.training_set("gate", 3).sha256 == snap.sha256  # rebuilds from the ledger
    assert (tmp_path / "weights/rm/v2/COMPLETE").is_file()  # rejected weights kept for audit
    assert any("RM v2 rejected: worse" in line for line in lines)

    restored = RMService(cfg, ledger, tmp_path, lines.append)
    assert restored.restore_serving().version == 3
    state = unpack_state(ray.get(restored.serving.weights))
    assert torch.isfinite(state["head.weight"]).all()


def _split_ids(snap, fresh_after, base, cfg, version):
    rm = cfg.rm
    split = split_refresh(snap.rows, fresh_after, base, rm.replay_fraction, rm.replay_window,
                          rm.fresh_eval_fraction, cfg.campaign.seed, version)
    ids = [r.preference_id for r in snap.rows]
    return ([ids[i] for i in split.train], [ids[i] for i in split.fresh_eval], split.fresh,
            split.replay)


def test_a_refresh_reads_a_window_that_splits_like_the_whole_snapshot(tmp_path):
    """`RMService.snapshot()` reads the fresh labels and the replay window only, and the
    refresh's training and test sets are the ones the whole snapshot gives."""
    cfg = load_config("configs/tiny.yaml", [*OVERRIDES, "rm.replay_window=40",
                                            f"campaign.run_dir={tmp_path}"])
    ledger = Ledger.open(f"sqlite:///{tmp_path}/ledger.sqlite")
    ledger.ensure_campaign("gate")
    seed_pairs(ledger, "gate", synthetic_pairs(0, 50), source="s1")
    first = ledger.snapshot("gate")  # RM v1's training set: ids 1..50
    ledger.record_model_version("gate", "rm", 1, snapshot=first.ref)
    seed_pairs(ledger, "gate", synthetic_pairs(50, 250), source="s2")
    served = ledger.snapshot("gate")  # RM v2 trained at 300: ids 51..300 held out partly
    ledger.record_model_version("gate", "rm", 2, snapshot=served.ref, parent_version=1)
    seed_pairs(ledger, "gate", synthetic_pairs(300, 30), source="s3")  # fresh: 301..330

    service = RMService(cfg, ledger, tmp_path, lambda line: None)
    service.serving = ServingRM(2, served.watermark, weights=None)
    window = service.snapshot()
    whole = ledger.snapshot("gate")
    assert 0 < window.since < 300 - 40 and len(window.rows) < len(whole.rows) / 2
    assert window.watermark == whole.watermark == 330
    assert _split_ids(window, 300, 50, cfg, 3) == _split_ids(whole, 300, 50, cfg, 3)
    train, _, fresh, replay = _split_ids(window, 300, 50, cfg, 3)
    assert replay == fresh and min(train) > window.since  # replay drawn from the window
    assert older_trainable(window.rows, 300, 50, 0.3, cfg.campaign.seed) >= 40

    no_rm_yet = RMService(cfg, ledger, tmp_path, lambda line: None)
    assert no_rm_yet.snapshot().since == 0  # the first RM reads everything
