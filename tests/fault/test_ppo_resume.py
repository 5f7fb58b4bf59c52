"""Issue #9, item 2: kill the campaign at PPO step k, resume, and compare with an uninterrupted
run.

What "step k" is here. A checkpoint is taken per campaign iteration (`campaign.checkpoint_every`),
and one iteration runs one PPO update (`ppo.epochs` × minibatches) on that iteration's rollout
batch; nothing inside an update is resumable, so an iteration boundary is the finest point a
resume continues from (a kill inside iteration k + 1 redoes it from checkpoint k, which
tests/fault/test_checkpoint_kill.py covers). Step k = the end of iteration k: the process is
SIGKILLed once checkpoint ``it-<k>`` is COMPLETE, before iteration k + 1 starts anything.

The runs. Real `run_campaign` processes (`ppo_resume_child.py`) on configs/tiny.yaml — real
Ray, DeepSpeed ZeRO-2 PPO and RM trainers, the simulated labeler, a SQLite ledger, RM refreshes
every iteration — run 5 iterations uninterrupted (A) and, separately, 3 iterations, SIGKILL,
resume to 5 (B). The shapes are chosen to hit the awkward cases at once:
- 6 prompts, 4 per iteration (the prompt set is not divisible by the batch): iteration 1
  straddles the first epoch boundary of the prompt stream, and the kill after iteration 3 lands
  exactly on an epoch boundary (12 prompts = 2 epochs), so the resumed iteration 4 opens a fresh
  shuffle;
- 8 rollout rows per update, minibatches of 3 (not divisible: 2 minibatches per epoch, 2 rows
  wait for the next epoch's shuffle);
- an adaptive KL controller with a short horizon, so β moves ~10 % per update.

Compared (`differences`): the final checkpoint's policy and value weights and DeepSpeed
optimizer state (Adam moments, fp32 master copies, step counts), the KL controller's β, the
update count (the PPO random stream: minibatch shuffles are seeded by (seed, update, epoch),
rollouts by (seed, iteration), so no generator state exists beyond these counters, and equal
losses show the streams matched), the loop state (data position, policy/RM versions,
watermark, monitor history), per-iteration `ppo/*` metrics of metrics.jsonl within 1e-6, and
every generation in the ledger (sample index, prompt, text, policy version). Also: after the
resume exactly iterations 4 and 5 ran (2 updates × 2 epochs × 2 minibatches = 8 optimizer
steps), and the prompts of iteration i are `PromptStream.batch(i)` — none skipped or replayed.

Negative control: the same resume from a copy of B's run directory, restoring everything but
the KL controller (β back to its initial value), is caught by the same comparison (β, losses,
weights); and a prompt position that restarts from 0 after the resume is caught by the prompt
check.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from actors.core.metrics import read_jsonl
from loop.config_load import load_config
from loop.prompts import PromptStream, load_prompts
from storage.ledger import Ledger
from storage.models import Generation, Prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # five tiny campaigns on 2 cores

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
N, K = 5, 3
"""Iterations of the campaign; the kill comes after checkpoint it-<K>."""
ROWS, MINIBATCH, EPOCHS = 8, 3, 2
OVERRIDES = ["campaign.name=resume", f"campaign.iterations={N}", "campaign.checkpoint_every=1",
             "campaign.prompts.max_prompts=6", "rollout.prompts_per_iteration=4",
             "rollout.samples_per_prompt=2", f"ppo.minibatch_size={MINIBATCH}",
             f"ppo.epochs={EPOCHS}", "ppo.kl.controller=adaptive", "ppo.kl.horizon=16",
             "metrics.progress=lines"]
TOL = 1e-6
VOLATILE = ("timing/", "per_s")
"""Metric keys that measure time, not state."""
STARTUP_S = 1500.0


def child(mode: str, run_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled",
           "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(HERE / "ppo_resume_child.py"), mode,
                             str(run_dir), *OVERRIDES], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, deadline: float) -> str:
    """Wait for a child to exit 0; its output."""
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"{log.name}: still running at the deadline\n{log.read_text()[-3000:]}")
    out = log.read_text()
    assert proc.returncode == 0, f"{log.name} exited {proc.returncode}\n{out[-3000:]}"
    return out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a child and everything it started in its session (Ray's daemons, workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def kill_at_barrier(proc: subprocess.Popen, run_dir: Path, log: Path, deadline: float) -> int:
    """Wait until the child sits at its barrier after checkpoint it-<K>; SIGKILL it."""
    barrier = run_dir / "paused"
    while not barrier.exists():
        if proc.poll() is not None:
            pytest.fail(f"the child exited {proc.returncode} before the barrier\n"
                        f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"the child did not reach checkpoint it-{K} in time")
        time.sleep(0.2)
    assert int(barrier.read_text()) == proc.pid
    os.kill(proc.pid, signal.SIGKILL)  # the campaign process itself, like a lost driver
    status = proc.wait(timeout=60)
    kill_group(proc)  # and whatever of its local Ray outlived it
    barrier.unlink()
    return status


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: uninterrupted; B: killed after it-<K>, resumed; C: B's copy resumed without β."""
    root = tmp_path_factory.mktemp("resume")
    full, killed, control = root / "full", root / "killed", root / "control"
    deadline = time.monotonic() + STARTUP_S
    a = child("full", full, root / "full.log")
    b = child("stop", killed, root / "stop.log")
    try:
        status = kill_at_barrier(b, killed, root / "stop.log", deadline)
        at_kill = {"status": status, "files": sorted(p.name for p in
                                                     (killed / "checkpoints").iterdir()),
                   "ckpt": ppo_states(killed / f"checkpoints/it-{K:06d}")[0],
                   "generations": len(generations(killed))}
        shutil.copytree(killed, control)
        deadline = time.monotonic() + STARTUP_S
        resumed = child("resume", killed, root / "resume.log")
        dropped = child("resume-drop-kl", control, root / "control.log")
        logs = {"full": finish(a, root / "full.log", deadline),
                "resume": finish(resumed, root / "resume.log", deadline),
                "control": finish(dropped, root / "control.log", deadline)}
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                kill_group(proc)
    return {"full": full, "killed": killed, "control": control, "at_kill": at_kill,
            "logs": logs}


def ppo_states(checkpoint: Path) -> tuple[dict, dict]:
    """The DeepSpeed model-state and optimizer-state files of a campaign checkpoint."""
    ds = checkpoint / "ppo" / "ppo"
    model = torch.load(ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    optim = torch.load(ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)
    return model, optim


def generations(run_dir: Path) -> list[tuple[int, str, str, int]]:
    """(sample index, prompt, text, policy version) of every rollout generation (not the seed
    pairs), in a stable order."""
    ledger = Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite")
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(Generation.sample_index, Prompt.text, Generation.text,
                                   Generation.policy_version)
                            .join(Prompt, Prompt.id == Generation.prompt_id)
                            .where(Generation.worker.like("rollout-%"))).all()
    return sorted(tuple(r) for r in rows)


def diff_values(a, b, path: str, out: list[str]) -> None:
    """Append a line per difference between two checkpoint values (tensors to TOL)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or (
                a.shape != b.shape):
            out.append(f"{path}: {getattr(a, 'shape', a)} vs {getattr(b, 'shape', b)}")
        elif a.numel() and (gap := (a.double() - b.double()).abs().max().item()) > TOL:
            out.append(f"{path}: max |Δ| {gap:.3g}")
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            diff_values(a.get(key), b.get(key), f"{path}.{key}", out)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            diff_values(x, y, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float):
        if abs(a - b) > TOL:
            out.append(f"{path}: {a!r} vs {b!r}")
    elif hasattr(a, "__dict__") and type(a) is type(b):
        diff_values(vars(a), vars(b), path, out)
    elif a != b:
        out.append(f"{path}: {a!r} vs {b!r}")


def step_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """The last logged metrics of each iteration ≥ 1 (a resumed run logs step 0 again)."""
    rows = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        if row["step"] >= 1:
            rows[row["step"]] = {k: v for k, v in row.items() if k.startswith("ppo/")
                                 and not any(s in k for s in VOLATILE)}
    return rows


def differences(want: Path, got: Path) -> list[str]:
    """Everything in which run `got` differs from run `want` (empty: the same campaign)."""
    out: list[str] = []
    final = f"checkpoints/it-{N:06d}"
    for name, a, b in zip(("model", "optimizer"), ppo_states(want / final),
                          ppo_states(got / final), strict=True):
        diff_values(a, b, name, out)
    loop_a, loop_b = (json.loads((d / final / "loop.json").read_text()) for d in (want, got))
    diff_values(loop_a, loop_b, "loop", out)
    diff_values(step_metrics(want), step_metrics(got), "metrics", out)
    if generations(want) != generations(got):
        out.append("ledger: the generations differ")
    return out


def iterations_run(log: str) -> list[int]:
    return [int(line.split("iteration ", 1)[1].split("/")[0]) for line in log.splitlines()
            if f"/{N}: reward" in line]


def test_resume_after_a_kill_at_an_epoch_boundary_continues_the_campaign_exactly(runs):
    at_kill = runs["at_kill"]
    assert at_kill["status"] == -signal.SIGKILL
    assert at_kill["files"][-1] == f"it-{K:06d}"  # complete, and nothing of iteration K + 1
    assert at_kill["generations"] == K * ROWS

    assert differences(runs["full"], runs["killed"]) == []

    # exactly the remaining iterations ran, each one PPO update of epochs × ⌊rows / minibatch⌋
    log = runs["logs"]["resume"]
    assert f"resumed from {runs['killed'] / 'checkpoints' / f'it-{K:06d}'}" in log
    assert iterations_run(log) == list(range(K + 1, N + 1))
    final, _ = ppo_states(runs["killed"] / f"checkpoints/it-{N:06d}")
    steps_per_update = EPOCHS * (ROWS // MINIBATCH)
    assert final["global_steps"] - at_kill["ckpt"]["global_steps"] == (N - K) * steps_per_update
    assert (at_kill["ckpt"]["updates"], final["updates"]) == (K, N)
    assert final["kl"]["value"] < 0.95 * 0.1  # β moved: the controller state mattered

    # no sample skipped or replayed: iterations 0..N-1 drew PromptStream.batch(i) once each,
    # and the ledger holds each generation once (empty replies are not logged)
    assert consumed(runs["killed"]) == expected_prompts() == consumed(runs["full"])
    gens = generations(runs["killed"])
    assert len(gens) == len(set(gens)) and len(gens) > (N - 1) * ROWS
    assert {g[3] for g in gens} == set(range(N))  # iteration i samples with policy v<i>


def consumed(run_dir: Path) -> list[tuple[int, list[str]]]:
    """(iteration, prompts) in the order the driver drew them, across kill and resume."""
    lines = (run_dir / "consumed.jsonl").read_text(encoding="utf-8").splitlines()
    return [(row["iteration"], row["prompts"]) for row in map(json.loads, lines)]


def expected_prompts(restart_at: int | None = None) -> list[tuple[int, list[str]]]:
    """`PromptStream.batch(i)` for i < N; `restart_at`: a stream that lost its position there
    and starts over (what a resume without the data position would draw)."""
    cfg = load_config("configs/tiny.yaml", OVERRIDES)
    stream = PromptStream(tuple(load_prompts(cfg)), cfg.campaign.seed, 4)
    order = [i if restart_at is None or i < restart_at else i - restart_at for i in range(N)]
    return [(i, stream.batch(i)) for i in order]


def test_negative_control_a_resume_that_drops_the_kl_controller_is_detected(runs):
    assert "negative control: the KL controller was NOT restored" in runs["logs"]["control"]
    found = differences(runs["full"], runs["control"])
    assert any(line.startswith("model.kl.value") for line in found), found
    assert any(line.startswith("metrics") and "ppo/kl_coef" in line for line in found), found
    assert any(line.startswith("metrics") and "ppo/policy_loss" in line for line in found)
    assert any(line.startswith("model.module.") for line in found), found  # weights moved


def test_negative_control_a_lost_prompt_position_is_detected(runs):
    # at an epoch boundary a stream that restarts could pass for the right one; it cannot:
    # the shuffle of epoch 2 is not that of epoch 0
    restarted = expected_prompts(restart_at=K)
    assert [p for _, p in restarted] != [p for _, p in consumed(runs["full"])]
    assert consumed(runs["killed"]) != restarted
