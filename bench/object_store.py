"""Policy weights to a worker: prefloop's object-store path vs a disk round trip.

The trainer publishes a new policy version once (`ray.put` of `pack_state`) and every rollout
worker pulls the ref and `unpack_state`s it. Peers, in the same run: a disk round trip
(`torch.save`, then `torch.load` in the worker — what a framework without the object store does)
and a naive `ray.put` of the torch state dict (tensors get pickled). All three move the same
weights — SmolLM2-135M's architecture (the demo policy), fp32, tied embeddings once — to the same
actor, timed end to end (publish + the worker holding the tensors); medians of several rounds.

Ends with: RESULT speedup_vs_disk=… speedup_vs_pickled=… packed_s=… disk_s=… pickled_s=… mb=…
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from actors.core.weight_transport import pack_state, unpack_state

# SmolLM2-135M-Instruct's architecture (config.json of the model), random weights.
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


@ray.remote
class Worker:
    def take_ref(self, refs: list) -> int:
        state = ray.get(refs[0])
        return sum(t.numel() for t in state.values())

    def take_packed(self, refs: list) -> int:
        state = unpack_state(ray.get(refs[0]))  # arrays map the shared-memory object: no copy
        return sum(t.numel() for t in state.values())

    def take_file(self, path: str) -> int:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return sum(t.numel() for t in state.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
    state = {k: v.detach().clone() for k, v in model.named_parameters()}  # tied weights once
    numel = sum(t.numel() for t in state.values())
    mb = numel * 4 / 2**20
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    worker = Worker.remote()
    ray.get(worker.take_ref.remote([ray.put({"w": torch.zeros(1)})]))  # warm the actor

    obj_times, np_times, disk_times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            t0 = time.perf_counter()
            ref = ray.put(state)
            assert ray.get(worker.take_ref.remote([ref])) == numel
            obj_times.append(time.perf_counter() - t0)
            del ref

            t0 = time.perf_counter()
            ref = ray.put(pack_state(state))
            assert ray.get(worker.take_packed.remote([ref])) == numel
            np_times.append(time.perf_counter() - t0)
            del ref

            t0 = time.perf_counter()
            path = os.path.join(tmp, f"policy-{i}.pt")
            torch.save(state, path)
            assert ray.get(worker.take_file.remote(path)) == numel
            disk_times.append(time.perf_counter() - t0)
            os.remove(path)
            print(f"round {i}: pickled {obj_times[-1]:.3f}s  packed {np_times[-1]:.3f}s  "
                  f"disk {disk_times[-1]:.3f}s")
    ray.shutdown()
    obj, arr = statistics.median(obj_times), statistics.median(np_times)
    disk = statistics.median(disk_times)
    print(f"{numel / 1e6:.1f}M params ({mb:.0f} MiB fp32), median of {args.rounds} rounds")
    print(f"RESULT speedup_vs_disk={disk / arr:.2f} speedup_vs_pickled={obj / arr:.2f} "
          f"packed_s={arr:.3f} disk_s={disk:.3f} pickled_s={obj:.3f} mb={mb:.0f}")


if __name__ == "__main__":
    main()
