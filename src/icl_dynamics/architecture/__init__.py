"""The one layer between the measurements and a model family's modules.

Every measurement reads a model through :func:`architecture` (an :class:`~icl_dynamics.architecture.base.Architecture`):
attention patterns per head, each head's output before the output projection, per-head W_Q/W_K/W_V/W_O with
the norms on the head's path, embedding and unembedding, the final norm. Only the modules of this package
name a family's internals (``gpt_neox``, ``query_key_value``, ``q_proj``, ``embed_tokens`` ...);
``tests/test_architecture.py`` greps the rest of the package for them.

Built on transformers' own modules, not on TransformerLens's bridge or nnsight: measured on the same
fixtures, see ``benchmarks/architecture_libraries.py`` and the README ("Model families").

This module is light (no torch import): the configuration check reads :data:`FAMILIES` to refuse an
unsupported family by name before any job starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from icl_dynamics.architecture.base import Architecture


class UnsupportedFamily(ValueError):
    """A model of a family the measurements do not support (named in the message)."""


@dataclass(frozen=True)
class Family:
    """A supported model family: its name in the configuration, transformers' ``model_type`` and class,
    the hub ids it covers and how its repositories name their training checkpoints."""

    name: str
    label: str
    model_type: str
    model_class: str
    id_pattern: str  # hub ids of this family (case-insensitive full match)
    branches: str  # how the checkpoint branches are named


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("gpt-neox", "GPT-NeoX (Pythia, PolyPythia)", "gpt_neox", "GPTNeoXForCausalLM",
               r"EleutherAI/pythia-[\w.-]+|icl-dynamics/toy-neox[\w.-]*", "step<N>"),
        Family("olmo", "OLMo-1 (the -hf repositories)", "olmo", "OlmoForCausalLM",
               r"allenai/OLMo-[\w.-]+-hf", "step<N>-tokens<M>B"),
        Family("olmo2", "OLMo-2", "olmo2", "Olmo2ForCausalLM", r"allenai/OLMo-2-[\w.-]+",
               "[stage1-]step<N>-tokens<M>B (stage 2: stage2-ingredient<k>-step<N>-tokens<M>B, refused)"),
    )
}

# hub ids of families we know and do not support, with what to do instead (checked before FAMILIES)
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"allenai/OLMo-(1B|7B)(-Twin-2T|-0424|-0724)?", "the original OLMo-1 format (hf_olmo, needs trust_remote_code); "
                                                     "use its -hf repository, e.g. allenai/OLMo-1B-hf"),
    (r"allenai/OLMoE-[\w.-]+", "OLMoE (mixture of experts, OlmoeForCausalLM)"),
    (r"allenai/Olmo-3[\w.-]*|allenai/OLMo-3[\w.-]*", "OLMo-3 (Olmo3ForCausalLM: sliding-window attention)"),
    (r"[\w.-]+/(Meta-)?Llama[\w.-]*", "Llama (LlamaForCausalLM)"),
    (r"[\w.-]+/Mistral[\w.-]*|[\w.-]+/Mixtral[\w.-]*", "Mistral (MistralForCausalLM)"),
    (r"[\w.-]+/Qwen[\w.-]*", "Qwen"),
    (r"[\w.-]+/gemma[\w.-]*", "Gemma"),
    (r"openai-community/gpt2[\w.-]*|gpt2[\w.-]*|[\w.-]+/gpt2[\w.-]*", "GPT-2 (GPT2LMHeadModel)"),
    (r"facebook/opt-[\w.-]+", "OPT (OPTForCausalLM)"),
)
MODEL_TYPES = {family.model_type: family for family in FAMILIES.values()}


def supported() -> str:
    """The supported families, for messages: ``gpt-neox (GPT-NeoX (Pythia, PolyPythia)), ...``."""
    return ", ".join(f"{f.name} ({f.label})" for f in FAMILIES.values())


def family_of(model_id: str, declared: str | None = None) -> Family | None:
    """The family of hub model ``model_id``: ``declared`` when given (config key ``families``), else the
    family whose ids it matches, else None (unknown). A family we know and do not support raises
    :class:`UnsupportedFamily` naming it."""
    if declared is not None:
        if declared not in FAMILIES:
            raise UnsupportedFamily(f"{model_id}: family {declared!r} is not supported; supported: {supported()}")
        return FAMILIES[declared]
    for pattern, what in UNSUPPORTED:
        if re.fullmatch(pattern, model_id, flags=re.IGNORECASE):
            raise UnsupportedFamily(f"{model_id} is a model of a family the measurements do not support: {what}; "
                                    f"supported: {supported()}")
    for family in FAMILIES.values():
        if re.fullmatch(family.id_pattern, model_id, flags=re.IGNORECASE):
            return family
    return None


def family_of_model(model: nn.Module) -> Family:
    """The family of a loaded model, from its config's ``model_type``; any other raises, naming it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise UnsupportedFamily(f"{type(model).__name__} (model_type {model_type!r}) is not a supported model "
                                f"family; supported: {supported()}")
    return MODEL_TYPES[model_type]


def sequence_start_id(config: object) -> int | None:
    """The token the relation index and the ablation prepend to a sequence (the attention sink): the config's
    BOS, else its EOS, the document separator the OLMo models were trained with (their configs name no BOS)."""
    bos = getattr(config, "bos_token_id", None)
    if bos is not None:
        return int(bos)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def architecture(model: nn.Module) -> Architecture:
    """The :class:`~icl_dynamics.architecture.base.Architecture` of a loaded causal LM (kept on the model, so
    every measurement of one checkpoint shares it). Raises :class:`UnsupportedFamily` for any other model."""
    cached = getattr(model, "_icl_architecture", None)
    if cached is not None and cached.model is model:
        return cached
    family = family_of_model(model)
    if family.name == "gpt-neox":
        from icl_dynamics.architecture.gpt_neox import GPTNeoX as cls
    elif family.name == "olmo":
        from icl_dynamics.architecture.olmo import Olmo as cls
    else:
        from icl_dynamics.architecture.olmo import Olmo2 as cls
    arch = cls(model)
    object.__setattr__(model, "_icl_architecture", arch)  # not a submodule: plain attribute
    return arch
