"""Build the architecture layer on transformers' own modules, TransformerLens 4's bridge or nnsight?

On the same random model of each family (GPT-NeoX, OLMo-1, OLMo-2; float32, eager attention, CPU), each
way reads what the measurements need from one forward pass: every layer's attention pattern and every
head's values. Printed per family and way: seconds per pass (median of ``--repeats``, after one warm-up),
the largest difference from a float64 run of the same model (patterns and values), and the time to set the
way up. Run it in an environment that has the libraries (they are not dependencies of the project):

    python -m venv /tmp/libvenv && /tmp/libvenv/bin/pip install -c constraints-cpu.txt transformer-lens nnsight
    PYTHONPATH=src /tmp/libvenv/bin/python benchmarks/architecture_libraries.py

A way that fails (not installed, family unsupported) prints the error instead of numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(family: str, layers: int, hidden: int, heads: int, vocab: int):
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Olmo2Config,
        Olmo2ForCausalLM,
        OlmoConfig,
        OlmoForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, max_position_embeddings=512)
    if family == "gpt-neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.25))
    elif family == "olmo":
        model = OlmoForCausalLM(OlmoConfig(**common, tie_word_embeddings=True))
    else:
        model = Olmo2ForCausalLM(Olmo2Config(**common, rms_norm_eps=1e-6))
    model.set_attn_implementation("eager")
    model.config.architectures = [type(model).__name__]  # as from_pretrained leaves it (the bridge reads it)
    return model.eval()


def ours(model):
    from icl_dynamics.architecture import architecture
    from icl_dynamics.attention import capture_attention

    arch = architecture(model)

    def run(tokens):
        patterns, values = {}, {}
        with torch.no_grad(), arch.capture_values(values.__setitem__), \
                capture_attention(model, lambda layer, p: patterns.__setitem__(layer, p)):
            arch.base()(input_ids=tokens)
        return patterns, values

    return run


def nnsight_way(model):
    from nnsight import NNsight

    wrapped = NNsight(model)
    arch_of = _module_paths(model)

    def run(tokens):
        saved_p, saved_v = [], []
        with torch.no_grad(), wrapped.trace(tokens):
            for attention, value in arch_of(wrapped):  # in execution order: the values come first
                saved_v.append(value.output.save())
                saved_p.append(attention.output[1].save())
        h, dh = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
        values = {}
        for i, v in enumerate(saved_v):
            v = getattr(v, "value", v)
            b, t, _ = v.shape
            values[i] = (v.view(b, t, h, 3, dh)[:, :, :, 2] if model.config.model_type == "gpt_neox"
                         else v.view(b, t, -1, dh)).transpose(1, 2)
        return {i: getattr(p, "value", p) for i, p in enumerate(saved_p)}, values

    return run


def _module_paths(model):
    """The (attention, value projection) modules of each layer, as this benchmark's reference knows them."""
    if model.config.model_type == "gpt_neox":
        return lambda m: [(layer.attention, layer.attention.query_key_value) for layer in m.gpt_neox.layers]
    return lambda m: [(layer.self_attn, layer.self_attn.v_proj) for layer in m.model.layers]


def transformer_lens_way(model):
    from transformer_lens.model_bridge.sources.transformers.source import boot

    folder = Path(tempfile.mkdtemp())
    model.config.save_pretrained(folder)  # the bridge reads the config by name; the weights are the model's
    _write_tokenizer(folder)
    bridge = boot(str(folder), hf_model=model, device="cpu")

    def run(tokens):
        with torch.no_grad():
            _, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith(("hook_pattern", "hook_v")))
        patterns = {i: cache[f"blocks.{i}.attn.hook_pattern"] for i in range(model.config.num_hidden_layers)}
        values = {i: _as_bhtd(cache[f"blocks.{i}.attn.hook_v"], model) for i in range(model.config.num_hidden_layers)}
        return patterns, values

    return run


def _as_bhtd(v, model):
    h = model.config.num_attention_heads
    if v.dim() == 4:  # [B, T, H, dh]
        return v.transpose(1, 2)
    b, t, _ = v.shape
    if model.config.model_type == "gpt_neox":
        return v.view(b, t, h, 3, -1)[:, :, :, 2].transpose(1, 2)
    return v.view(b, t, h, -1).transpose(1, 2)


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>").save_pretrained(folder)


def reference(model, tokens):
    """float64 patterns (the model's own output_attentions) and values (ours, checked against the modules by
    tests/test_architecture.py)."""
    import copy

    double = copy.deepcopy(model).double()
    run = ours(double)
    return run(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    ways = {"transformers modules (ours)": ours, "nnsight": nnsight_way, "TransformerLens 4 bridge": transformer_lens_way}
    print(f"{args.layers} layers, d_model {args.hidden}, {args.heads} heads, vocab {args.vocab}; "
          f"{args.batch} x {args.length} tokens; CPU, 1 thread, torch {torch.__version__}")
    print("| family | way | setup s | s per pass | max |pattern - float64| | max |values - float64| |")
    print("|---|---|---|---|---|---|")
    for family in ("gpt-neox", "olmo", "olmo2"):
        model = build(family, args.layers, args.hidden, args.heads, args.vocab)
        ref_p, ref_v = reference(model, tokens)
        for name, way in ways.items():
            try:
                start = time.perf_counter()
                run = way(model)
                setup = time.perf_counter() - start
                run(tokens)  # warm-up
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    patterns, values = run(tokens)
                    times.append(time.perf_counter() - start)
                dp = max(float((patterns[i].double() - ref_p[i]).abs().max()) for i in range(args.layers))
                dv = max(float((values[i].double() - ref_v[i]).abs().max()) for i in range(args.layers))
                print(f"| {family} | {name} | {setup:.2f} | {statistics.median(times):.3f} | {dp:.1e} | {dv:.1e} |")
            except Exception as exc:  # noqa: BLE001 - report and go on
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                print(f"| {family} | {name} | failed: {type(exc).__name__}: {first} | | | |")


if __name__ == "__main__":
    main()
