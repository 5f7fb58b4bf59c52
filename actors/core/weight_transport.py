"""Moving weights through the Ray object store without copies.

Ray stores numpy arrays out-of-band and a reader maps them straight from shared memory, while a
torch tensor is pickled into the store and unpickled again by every reader. `bench/object_store.py`
measured it for SmolLM2-135M's weights on 2 cores: pickled tensors 3.7 s, a `torch.save`/`load`
disk round trip 1.1 s, these packed arrays 0.38 s. So weights travel as a `PackedState`.

numpy has no bfloat16: such tensors travel as their raw int16 bits and are viewed back.

>>> import torch
>>> state = {"w": torch.arange(4, dtype=torch.bfloat16)}
>>> torch.equal(unpack_state(pack_state(state))["w"], state["w"])
True
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

_VIEW_AS = {torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class PackedState:
    """A state dict as numpy arrays plus the torch dtype of each entry.

    Attributes:
        arrays: name → array (any shape); bf16 entries hold their int16 bit patterns.
        dtypes: name → torch dtype name, e.g. "float32", "bfloat16".
    """

    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def pack_state(state: Mapping[str, torch.Tensor]) -> PackedState:
    """Detach each tensor to CPU and expose it as a numpy array (no copy for CPU fp32/int)."""
    arrays, dtypes = {}, {}
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        arrays[name] = t.view(_VIEW_AS.get(t.dtype, t.dtype)).numpy()
    return PackedState(arrays, dtypes)


def unpack_state(packed: PackedState) -> dict[str, torch.Tensor]:
    """Tensors that share memory with the packed arrays (read-only when they came from Ray).

    Use them as a source (`model.load_state_dict(...)` copies); never write into them.
    """
    out = {}
    with warnings.catch_warnings():
        # Arrays from the object store are read-only; torch warns that writes would be unsafe.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for name, array in packed.arrays.items():
            dtype = getattr(torch, packed.dtypes[name])
            out[name] = torch.from_numpy(array).view(dtype)
    return out
