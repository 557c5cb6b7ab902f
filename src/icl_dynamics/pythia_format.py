"""A hub-layout cache that mirrors a real Pythia repository in everything but size.

Tests and benchmarks cannot reach the hub, so they run the pipeline's own loaders on this instead:
random GPT-NeoX weights saved the way Pythia's step branches store them (a float16
``pytorch_model.bin`` under Pythia's key names: ``embed_out`` for the unembedding and the old
attention buffers ``attention.bias``, ``attention.masked_bias`` and ``attention.rotary_emb.inv_freq``),
the published ``config.json`` fields (``torch_dtype: float16``, ``transformers_version: 4.24.0``,
vocabulary 50,304) with smaller dimensions, and the repository's own tokenizer files
(``tokenizer.json``, ``tokenizer_config.json`` with ``GPTNeoXTokenizerFast``,
``special_tokens_map.json``). ``step0`` and ``step1`` serve byte-identical weights, as on the hub.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from icl_dynamics import hub
from icl_dynamics.checkpoints import revision

TOKENIZER_SOURCES = {
    "tokenizer.json": Path("data/tokenizers/gpt-neox-20b/tokenizer.json"),
    "tokenizer_config.json": Path("data/pythia-format/tokenizer_config.json"),
    "special_tokens_map.json": Path("data/pythia-format/special_tokens_map.json"),
}
CONFIG_SOURCE = Path("data/pythia-format/config-pythia-70m.json")


@dataclass(frozen=True)
class PythiaShape:
    """The dimensions that differ between Pythia sizes (everything else is the published config)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4

    @classmethod
    def named(cls, size: str) -> PythiaShape:
        """The real shape of ``pythia-<size>`` (14m ... 12b), for benchmarks."""
        shapes = {"14m": (128, 6, 4), "31m": (256, 6, 8), "70m": (512, 6, 8), "160m": (768, 12, 12),
                  "410m": (1024, 24, 16), "1b": (2048, 16, 8), "1.4b": (2048, 24, 16), "2.8b": (2560, 32, 32),
                  "6.9b": (4096, 32, 32), "12b": (5120, 36, 40)}
        if size not in shapes:
            raise ValueError(f"unknown Pythia size {size!r}; choose one of {', '.join(shapes)}")
        return cls(*shapes[size])


def pythia_config(shared_dir: str | os.PathLike[str], shape: PythiaShape = PythiaShape()) -> dict:
    """pythia-70m's published ``config.json`` with ``shape``'s dimensions (MLP 4 x d_model, as in Pythia)."""
    config = json.loads((Path(shared_dir) / CONFIG_SOURCE).read_text())
    config.update(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
                  num_attention_heads=shape.num_attention_heads, intermediate_size=4 * shape.hidden_size)
    return config


def pythia_model(config: Mapping, seed: int = 0):
    """A randomly initialised ``GPTNeoXForCausalLM`` of a :func:`pythia_config` (float32, eval mode)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in config.items() if k != "torch_dtype"})).eval()


def pythia_state_dict(config: Mapping, seed: int, *, scale: Mapping[str, float] | None = None,
                      model=None) -> dict[str, torch.Tensor]:
    """Random float16 weights under the key names of Pythia's ``pytorch_model.bin`` (``model``: the weights
    of this model instead, e.g. one set by hand).

    ``scale`` multiplies the tensors whose name contains a key (e.g. to force a float16 overflow).
    """
    from icl_dynamics.architecture.gpt_neox import published_state_dict

    model = model if model is not None else pythia_model(config, seed)
    d_rot = int(config["hidden_size"] // config["num_attention_heads"] * config["rotary_pct"])
    return published_state_dict(model, config["max_position_embeddings"], d_rot, config["rotary_emb_base"], scale)


def write_pythia_cache(
    cache_dir: str | os.PathLike[str],
    model_id: str,
    shared_dir: str | os.PathLike[str],
    branches: Mapping[int, int] | Sequence[int],
    *,
    shape: PythiaShape = PythiaShape(),
    scale: Mapping[str, float] | None = None,
    model=None,
) -> dict[int, str]:
    """Write ``model_id`` into the hub cache ``cache_dir`` with one ``step<N>`` branch per step.

    ``branches`` maps each step to the seed of its weights (steps with one seed share one commit,
    byte for byte); a plain list of steps gives step 0 and step 1 one seed and every other step its
    own, as on the hub. ``model`` (a ``GPTNeoXForCausalLM`` of ``shape``, e.g. built by hand) gives every
    branch its weights instead. The tokenizer and config files come from ``shared_dir`` (the project's
    ``../shared``). Returns the commit of each step.
    """
    if not isinstance(branches, Mapping):
        branches = {step: 0 if step <= 1 else step for step in branches}
    shared = Path(shared_dir)
    config = pythia_config(shared, shape)
    small = {name: (shared / source).read_bytes() for name, source in TOKENIZER_SOURCES.items()}
    small["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    weights: dict[int, bytes] = {}
    commits = {}
    for seed in sorted(set(branches.values())):
        buffer = io.BytesIO()
        torch.save(pythia_state_dict(config, seed, scale=scale, model=model), buffer)
        weights[seed] = buffer.getvalue()
        steps = sorted(s for s, s_seed in branches.items() if s_seed == seed)
        commit = hub.write_snapshot(cache_dir, model_id, [revision(s) for s in steps],
                                    {**small, "pytorch_model.bin": weights[seed]}, lfs=["pytorch_model.bin"])
        commits.update({s: commit for s in steps})
    return commits
