"""Weights through the object store: exact round trips, no copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.core.weight_transport import pack_state, unpack_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64])
def test_round_trip_is_exact(dtype):
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": (torch.randn(3, 5, generator=g) * 100).to(dtype),
             "b.bias": torch.arange(7).to(dtype)}
    packed = pack_state(state)
    back = unpack_state(packed)
    assert list(back) == ["a.weight", "b.bias"]
    for name, tensor in state.items():
        assert back[name].dtype == dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)
    assert packed.nbytes == sum(t.numel() * t.element_size() for t in state.values())


def test_fp32_packing_shares_memory():
    weight = torch.randn(4, 4)
    packed = pack_state({"w": weight})
    assert np.shares_memory(packed.arrays["w"], weight.numpy())
    assert unpack_state(packed)["w"].data_ptr() == weight.data_ptr()


def test_bf16_travels_as_int16_bits():
    packed = pack_state({"w": torch.tensor([1.0, -2.0], dtype=torch.bfloat16)})
    assert packed.arrays["w"].dtype == np.int16
    assert packed.dtypes == {"w": "bfloat16"}
    # 1.0 in bfloat16 is 0x3F80, -2.0 is 0xC000
    assert packed.arrays["w"].view(np.uint16).tolist() == [0x3F80, 0xC000]


def test_through_the_object_store_into_a_model(ray_local):
    model = torch.nn.Linear(6, 3)

    @ray_local.remote
    def load(refs):
        target = torch.nn.Linear(6, 3)
        target.load_state_dict(unpack_state(ray_local.get(refs[0])))
        return target(torch.ones(1, 6))

    ref = ray_local.put(pack_state(model.state_dict()))
    out = ray_local.get(load.remote([ref]))
    assert torch.equal(out, model(torch.ones(1, 6)).detach())
