"""Hub-layout caches that mirror a real OLMo-1 (``allenai/OLMo-1B-hf``) or OLMo-2 (``allenai/OLMo-2-0425-1B``)
repository in everything but size, for tests and benchmarks (no machine here reaches the hub).

What each holds, as the repositories publish it (README, "Model families", says what was checked and what
assumed):

* ``config.json``: the published fields (``architectures``, ``model_type``, ``torch_dtype: float32``,
  ``transformers_version``, the token ids, rope_theta, vocabulary 50,304 / 100,352, OLMo-1's ``clip_qkv:
  null``, ``pretraining_tp`` and tied embeddings, OLMo-2's ``rms_norm_eps: 1e-06`` and untied ones) with
  smaller dimensions; ``generation_config.json``.
* weights in safetensors, float32, under the model's own key names (``save_pretrained``'s; no
  ``lm_head.weight`` when tied): OLMo-1B-hf one ``model.safetensors``, OLMo-2-0425-1B two shards and
  ``model.safetensors.index.json``.
* the repository's tokenizer files: ``tokenizer.json`` from ``../shared/data/tokenizers/olmo-1`` or
  ``olmo-2``, a ``tokenizer_config.json`` and ``special_tokens_map.json`` with the repository's behaviour (no
  BOS or EOS added; OLMo-1's EOS is id 50279 and its pad ``<|padding|>`` (1), as the conversion script writes
  them; OLMo-2's ``GPT2Tokenizer`` with ``<|endoftext|>`` (100257) as BOS/EOS/UNK and ``<|pad|>`` (100277)),
  OLMo-2's ``vocab.json`` and ``merges.txt``.
* branches named as the family names them (``step<N>-tokens<M>B``, ``stage1-...``, ``stage2-ingredient<k>-...``)
  and ``main``; branches with one seed share one commit, byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from icl_dynamics import hub

OLMO1_TOKENIZER = Path("data/tokenizers/olmo-1/tokenizer.json")
OLMO2_TOKENIZER = Path("data/tokenizers/olmo-2/tokenizer.json")
OLMO1_TOKENS_PER_STEP = 2048 * 2048  # OLMo-1B: 2,048 sequences of 2,048 tokens
OLMO2_TOKENS_PER_STEP = 512 * 4096  # OLMo-2-0425-1B: its branch names give 209.7B per 100,000 steps


@dataclass(frozen=True)
class OlmoShape:
    """The dimensions that differ from the published 1B models (everything else is their config)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4


def olmo_config(family: str, shape: OlmoShape = OlmoShape()) -> dict:
    """The published ``config.json`` of ``allenai/OLMo-1B-hf`` (family ``olmo``) or ``allenai/OLMo-2-0425-1B``
    (``olmo2``) with ``shape``'s dimensions (MLP 4 x d_model, as both)."""
    dims = dict(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
                num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_attention_heads,
                intermediate_size=4 * shape.hidden_size)
    if family == "olmo":
        return {"architectures": ["OlmoForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "initializer_range": 0.02,
                "max_position_embeddings": 2048, "model_type": "olmo", "pad_token_id": 1, "pretraining_tp": 1,
                "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
                "transformers_version": "4.40.0", "use_cache": True, "vocab_size": 50304, **dims}
    if family == "olmo2":
        return {"architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                "eos_token_id": 100257, "hidden_act": "silu", "initializer_range": 0.02,
                "max_position_embeddings": 4096, "model_type": "olmo2", "pad_token_id": 100277, "rms_norm_eps": 1e-06,
                "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32",
                "transformers_version": "4.48.0", "use_cache": True, "vocab_size": 100352, **dims}
    raise ValueError(f"unknown OLMo family {family!r}; choose olmo or olmo2")


def olmo_model(config: Mapping, seed: int = 0):
    """A randomly initialised ``OlmoForCausalLM`` / ``Olmo2ForCausalLM`` of an :func:`olmo_config` (float32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "transformers_version",
                                                            "model_type")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))
    if config["model_type"] == "olmo2":  # gains away from 1, so a dropped norm gain would show
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(torch.empty_like(param).uniform_(0.5, 1.5, generator=gen))
    return model.eval()


def _tokenizer_files(family: str, shared: Path) -> dict[str, bytes]:
    if family == "olmo":
        source = json.loads((shared / OLMO1_TOKENIZER).read_text())
        added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
                 for t in source["added_tokens"]}
        eos = next(t["content"] for t in source["added_tokens"] if t["id"] == 50279)  # what the config's EOS id holds
        config = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": None,
                  "clean_up_tokenization_spaces": True, "eos_token": eos, "model_max_length": 1e30,
                  "pad_token": "<|padding|>", "tokenizer_class": "GPTNeoXTokenizer", "unk_token": None}
        special = {"eos_token": eos, "pad_token": "<|padding|>"}
        files = {"tokenizer.json": (shared / OLMO1_TOKENIZER).read_bytes()}
    else:
        source = json.loads((shared / OLMO2_TOKENIZER).read_text())
        added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
                 for t in source["added_tokens"]}
        config = {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
                  "added_tokens_decoder": added, "bos_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
                  "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 4096,
                  "pad_token": "<|pad|>", "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>"}
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                   "unk_token": "<|endoftext|>"}
        merges = source["model"]["merges"]
        files = {"tokenizer.json": (shared / OLMO2_TOKENIZER).read_bytes(),
                 "vocab.json": json.dumps(source["model"]["vocab"], ensure_ascii=False).encode(),
                 "merges.txt": ("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in merges)
                                + "\n").encode()}
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    files["special_tokens_map.json"] = (json.dumps(special, indent=2) + "\n").encode()
    return files


def _weights(family: str, model) -> tuple[dict[str, bytes], list[str]]:
    """The weight files as the repository holds them: OLMo-1B-hf one model.safetensors, OLMo-2-0425-1B two
    shards and their index."""
    from safetensors.torch import save_file

    from icl_dynamics.architecture.olmo import published_state_dict

    state = published_state_dict(model)
    names = sorted(state)
    shards = [names] if family == "olmo" else [names[: len(names) // 2], names[len(names) // 2:]]
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, keys in enumerate(shards, 1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: state[k] for k in keys}, os.path.join(tmp, name), metadata={"format": "pt"})
            files[name] = Path(tmp, name).read_bytes()
    lfs = list(files)
    if len(shards) > 1:
        weight_map = {k: f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i, keys in enumerate(shards, 1) for k in keys}
        total = sum(t.numel() * t.element_size() for t in state.values())
        files["model.safetensors.index.json"] = (json.dumps({"metadata": {"total_size": total},
                                                             "weight_map": weight_map}, indent=2) + "\n").encode()
    return files, lfs


def olmo_branch(family: str, step: int, *, stage: str | None = "stage1") -> str:
    """A branch name as the family's repositories give it (tokens in whole billions, rounded up as OLMo-2's
    names are; OLMo-1's round to nearest): ``step<N>-tokens<M>B``, ``stage1-step<N>-tokens<M>B``,
    ``stage2-ingredient1-step<N>-tokens<M>B`` (``stage``: None, ``stage1``, ``stage2-ingredient<k>``)."""
    if family == "olmo":
        return f"step{step}-tokens{round(step * OLMO1_TOKENS_PER_STEP / 1e9)}B"
    tokens = math.ceil(step * OLMO2_TOKENS_PER_STEP / 1e9)
    return f"{stage + '-' if stage else ''}step{step}-tokens{tokens}B"


def write_olmo_cache(cache_dir: str | os.PathLike[str], model_id: str, shared_dir: str | os.PathLike[str],
                     family: str, branches: Mapping[str, int], *, shape: OlmoShape = OlmoShape(),
                     main: str | None = None) -> dict[str, str]:
    """Write ``model_id`` into the hub cache ``cache_dir``: ``branches`` maps each branch name to the seed of its
    weights (branches with one seed share one commit); ``main`` also points ``main`` at that branch's commit.
    Returns the commit of each branch."""
    shared = Path(shared_dir)
    config = olmo_config(family, shape)
    small = _tokenizer_files(family, shared)
    small["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    generation = {"_from_model_config": True, "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"], "transformers_version": config["transformers_version"]}
    small["generation_config.json"] = (json.dumps(generation, indent=2) + "\n").encode()
    commits: dict[str, str] = {}
    for seed in sorted(set(branches.values())):
        weights, lfs = _weights(family, olmo_model(config, seed))
        names = sorted(b for b, s in branches.items() if s == seed)
        revisions = names + (["main"] if main in names else [])
        commit = hub.write_snapshot(cache_dir, model_id, revisions, {**small, **weights}, lfs=lfs)
        commits.update(dict.fromkeys(names, commit))
    return commits
