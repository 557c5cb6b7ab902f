"""Head ablations (issue 15): mean ablation against a hand-written forward pass, shared-prefix batching
against one ablation at a time by weight editing, a hand-built copy head, and the toy zoo's induction heads."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_neox
from families import output_projection, tiny_model
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from icl_dynamics.ablation import (
    ablation_table,
    flagged_sih_heads,
    group_ablation_effects,
    head_ablation_effects,
    icl_score_set,
    icl_task_set,
    layer_matched_heads,
    relation_recall_set,
    top_induction_heads,
)
from icl_dynamics.icl import TextSource, iter_texts, loss_reduction, per_token_losses, select_documents
from icl_dynamics.icl_tasks import TASKS, evaluate_tasks, make_prompts
from icl_dynamics.induction import Probe, induction_rows
from icl_dynamics.io import to_table
from icl_dynamics.models import load_checkpoint
from icl_dynamics.schemas import ABLATION_SCHEMA
from icl_dynamics.toyzoo import SPECIAL_TOKENS, TOY_MODEL_ID, TOY_STEPS, build_tokenizer, toy_vocabulary


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny matrices run ~8x slower on two threads of a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- references


def hand_forward(model, ids: torch.Tensor, replace: dict[tuple[int, int], torch.Tensor] | None = None,
                 start: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """GPT-NeoX written out by hand (float64): logits [T, V] of one unpadded sequence and each layer's
    head outputs z [T, heads, d_head]; ``replace`` sets head (layer, head)'s z to a constant vector at
    every position from ``start`` on."""
    cfg, base = model.config, model.gpt_neox
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    d_head, n = d // heads, len(ids)
    dims = int(d_head * cfg.rope_parameters["partial_rotary_factor"])
    # transformers forms the rotary angles and their cos/sin in float32 whatever the model's dtype; so do we
    inv = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims)
    angle = torch.cat([torch.arange(n, dtype=torch.float32)[:, None] * inv] * 2, -1)
    cos, sin = angle.cos().double()[:, None], angle.sin().double()[:, None]

    def norm(x, ln):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    def rope(x):
        rot, rest = x[..., :dims], x[..., dims:]
        half = torch.cat([-rot[..., dims // 2:], rot[..., :dims // 2]], -1)
        return torch.cat([rot * cos + half * sin, rest], -1)

    x = base.embed_in.weight[ids]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    zs = []
    for layer, block in enumerate(base.layers):
        att = block.attention
        qkv = (norm(x, block.input_layernorm) @ att.query_key_value.weight.T + att.query_key_value.bias)
        q, k, v = qkv.view(n, heads, 3, d_head).unbind(2)
        scores = torch.einsum("qhe,khe->hqk", rope(q), rope(k)) / math.sqrt(d_head)
        pattern = scores.masked_fill(~causal, -math.inf).softmax(-1)
        z = torch.einsum("hqk,khe->qhe", pattern, v)
        for (at, head), mean in (replace or {}).items():
            if at == layer:
                z[start:, head] = mean
        zs.append(z)
        mlp = block.mlp
        hidden = torch.nn.functional.gelu(norm(x, block.post_attention_layernorm) @ mlp.dense_h_to_4h.weight.T
                                          + mlp.dense_h_to_4h.bias)
        x = x + (z.reshape(n, d) @ att.dense.weight.T + att.dense.bias) + (hidden @ mlp.dense_4h_to_h.weight.T
                                                                             + mlp.dense_4h_to_h.bias)
    return norm(x, base.final_layer_norm) @ model.get_output_embeddings().weight.T, zs


def dense_inputs(model, sequences) -> list[torch.Tensor]:
    """Per layer, the mean input of ``attention.dense`` over every position of ``sequences``, each run alone."""
    n_layers = model.config.num_hidden_layers
    total = [torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in range(n_layers)]
    count = 0

    def keep(layer):
        def hook(_module, args):
            total[layer] += args[0][0].sum(0)
        return hook

    handles = [output_projection(model, i).register_forward_pre_hook(keep(i)) for i in range(n_layers)]
    with torch.no_grad():
        for seq in sequences:
            model(torch.as_tensor(seq)[None])
            count += len(seq)
    for handle in handles:
        handle.remove()
    return [t / count for t in total]


def edited(model, heads, means):
    """A copy of ``model`` whose ``heads`` output their mean by weight editing: W_O's columns of the head
    are zeroed and what they wrote with the mean input moves into the W_O module's bias (one is attached where
    the family has none, as OLMo)."""
    out = copy.deepcopy(model)
    d_head = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer, head in heads:
            dense = output_projection(out, layer)
            if dense.bias is None:
                dense.bias = torch.nn.Parameter(torch.zeros(dense.out_features, dtype=dense.weight.dtype))
            cols = slice(head * d_head, (head + 1) * d_head)
            dense.bias += dense.weight[:, cols] @ means[layer][cols].to(dense.weight.dtype)
            dense.weight[:, cols] = 0
    return out


def row(frame: pd.DataFrame, **where) -> pd.Series:
    hit = frame
    for key, value in where.items():
        hit = hit[hit[key] == value]
    assert len(hit) == 1, where
    return hit.iloc[0]


# ----------------------------------------------------------------------------- exactness


def float64_neox(**kwargs) -> GPTNeoXForCausalLM:
    """:func:`tiny_neox` in float64 with sdpa attention: eager attention takes its softmax in float32."""
    model = tiny_neox(**kwargs).double()
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("keep_first", [True, False])
def test_mean_ablation_equals_a_hand_written_forward_pass(keep_first):
    """``keep_first`` (the default): position 0, the attention sink, keeps the head's own output and the mean
    is taken over the other positions; otherwise every position gets the mean over every position."""
    model = float64_neox(seed=3)
    docs = torch.randint(0, 64, (5, 24), generator=torch.Generator().manual_seed(1))
    early, late = 3, 20
    evaluation = icl_score_set(docs, early=early, late=late)
    got = head_ablation_effects(model, [evaluation], batch_size=2, n_boot=50, keep_first=keep_first)
    group = [(0, 2), (1, 1)]
    got_group = group_ablation_effects(model, [evaluation], {"g": group}, draws=0, n_boot=50, keep_first=keep_first)
    start = int(keep_first)

    def icl(replace=None):
        out = []
        for doc in docs:
            logits, _ = hand_forward(model, doc[:late], replace, start)
            logp = torch.log_softmax(logits, -1)
            out.append(float(logp[early - 1, doc[early]] - logp[late - 1, doc[late]]))
        return np.array(out)

    with torch.no_grad():
        assert torch.allclose(hand_forward(model, docs[0])[0], model(docs[:1]).logits[0], atol=1e-10)
        zs = [hand_forward(model, doc[:late])[1] for doc in docs]  # the reference set: the positions run
        means = [torch.cat([z[layer][start:] for z in zs]).mean(0) for layer in range(2)]  # [heads, d_head]
        clean = icl()
        assert got["baseline"].to_numpy() == pytest.approx(np.full(8, clean.mean()), abs=1e-12)
        for layer, head in itertools.product(range(2), range(4)):
            ablated = icl({(layer, head): means[layer][head]})
            assert row(got, layer=layer, head=head)["value"] == pytest.approx((ablated - clean).mean(), abs=1e-10)
        ablated = icl({h: means[h[0]][h[1]] for h in group})
    assert row(got_group, ablation="group")["value"] == pytest.approx((ablated - clean).mean(), abs=1e-10)
    assert got["value"].abs().max() > 1e-3  # the heads do matter: the comparison is not vacuous


def toy_tokenizer() -> PreTrainedTokenizerFast:
    bos, pad, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(toy_vocabulary()), bos_token=bos, eos_token=bos,
                                   pad_token=pad, unk_token=unk)


def relation_tables(rng: np.random.Generator, vocab: int) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple]]:
    """Sequences (two per document, of varied length) with one forward triplet each whose tail recurs one to
    three times (documents weigh the same whatever their event count), and the expected events (sequence,
    position read in the BOS-prefixed sequence, tail, document, family)."""
    seqs, trips, events = [], [], []
    for i in range(9):
        n = int(rng.integers(10, 20))
        head, tail = (int(t) for t in rng.choice(np.arange(40, vocab), 2, replace=False))
        filler = np.setdiff1d(np.arange(40, vocab), [head, tail])
        tokens = rng.choice(filler, n)
        s, o = (int(p) for p in rng.choice(n // 2, 2, replace=False))
        tokens[s], tokens[o] = head, tail
        # the last sequence's tail never recurs: no event, so it is not run at all (nor in the reference set)
        later = sorted(int(p) for p in rng.choice(np.arange(max(s, o) + 1, n), 1 + i % 3 if i < 8 else 0,
                                                   replace=False))
        tokens[later] = tail
        if i % 4 == 0:  # the head recurs too: a reverse-direction event, which recall leaves out
            tokens[next(p for p in range(n - 1, max(s, o), -1) if p not in later)] = head
        family = "kg" if i % 3 else "syntax"
        seqs.append(dict(sequence_id=10 + i, document_id=i // 2, source="t", unit="abstract", family=family, text="",
                         token_ids=tokens.tolist(), function_mask=[False] * n))
        for direction, a, b in (("forward", s, o), ("reverse", o, s)):
            trips.append(dict(sequence_id=10 + i, family=family, relation="r", category="c", direction=direction,
                              s=a, o=b, head_id=int(tokens[a]), tail_id=int(tokens[b]), head_str="", tail_str=""))
        # the tail at original position p is token p + 1 of the BOS-prefixed sequence, predicted at p
        events += [(i, p, tail, i // 2, family) for p in later]
    return pd.DataFrame(seqs), pd.DataFrame(trips), events


def test_a_capped_relation_set_is_the_first_sequences_of_each_family():
    """n_sequences reads the tables a chunk at a time and stops early: the same events as the whole set's
    first sequences of each family (9 sequences, two families, chunks of 4)."""
    seqs, trips, _ = relation_tables(np.random.default_rng(2), 64)
    config = tiny_neox(vocab_size=64).config
    full = relation_recall_set(config, seqs, trips)
    for cap in (1, 2):
        first: dict[str, list[int]] = {}
        for i, family in zip(full.reads[:, 0], full.families):
            if i not in first.setdefault(family, []) and len(first[family]) < cap:
                first[family].append(int(i))
        keep = sorted(i for ids in first.values() for i in ids)
        capped = relation_recall_set(config, seqs, trips, n_sequences=cap)
        assert [s.tolist() for s in capped.sequences] == [full.sequences[i].tolist() for i in keep]
        rows = np.isin(full.reads[:, 0], keep)
        assert capped.targets.tolist() == full.targets[rows].tolist()
        assert list(capped.families) == [f for f, r in zip(full.families, rows) if r]


@pytest.mark.parametrize("family, attention, tol", [("gpt-neox", "sdpa", 1e-10), ("gpt-neox", "eager", 1e-6),
                                                     ("olmo", "eager", 1e-6), ("olmo2", "eager", 1e-6)])
def test_shared_prefix_batching_equals_one_ablation_at_a_time(family, attention, tol):
    """Every head's effect on all three evaluation sets, batched (padding, shared prefixes), equals a plain
    forward pass of a weight-edited copy per head, scored by the pipeline's own ICL code where it has one, on
    every family (OLMo-2: the post-attention norm after W_O is the model's own in both). In float64; eager
    attention (the pipeline's) takes its softmax in float32, and OLMo's norms compute in float32, hence the
    tolerance."""
    tokenizer = toy_tokenizer()
    # large weights, so that single heads sway the prompts' predictions
    model = (tiny_neox(vocab_size=len(tokenizer), seed=5, initializer_range=1.0) if family == "gpt-neox" else
             tiny_model(family, vocab_size=len(tokenizer), seed=5, initializer_range=1.0, clip_qkv=4.0)).double()
    model.set_attn_implementation(attention)
    with torch.no_grad():  # and label digits near the top-1, so that format compliance is not always 0
        digits = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
        u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        if family == "gpt-neox":
            model.gpt_neox.final_layer_norm.bias.copy_(u)
        model.get_output_embeddings().weight[digits] += 4 * u / u.norm()
    rng = np.random.default_rng(2)
    seqs, trips, events = relation_tables(rng, len(tokenizer))
    docs = torch.randint(3, len(tokenizer), (6, 30), generator=torch.Generator().manual_seed(3))
    early, late, shots, n_prompts, tasks = 4, 25, 3, 6, (TASKS[0], TASKS[3])
    sets = [relation_recall_set(model.config, seqs, trips), icl_score_set(docs, early=early, late=late),
            icl_task_set(tokenizer, shots=shots, n_prompts=n_prompts, tasks=tasks)]
    got = head_ablation_effects(model, sets, batch_size=3, n_boot=50, keep_first=False)  # weight editing: every position

    bos = model.config.bos_token_id if model.config.bos_token_id is not None else model.config.eos_token_id
    rel_sequences = [[bos, *t] for t in seqs["token_ids"][:8]]
    prompts = [tokenizer.encode(p.text, add_special_tokens=False) for task in tasks
               for p in make_prompts(task, shots, n_prompts, 0)]
    means = {"relation_recall": dense_inputs(model, rel_sequences),
             "loss_reduction": dense_inputs(model, docs[:, :late].tolist()),
             "tasks": dense_inputs(model, prompts)}

    def recall(m) -> dict[str, float]:
        with torch.no_grad():
            logp = [torch.log_softmax(m(torch.tensor(s)[None]).logits[0], -1) for s in rel_sequences]
        per_doc: dict[tuple[str, int], list[float]] = {}
        for i, p, tail, doc, family in events:
            per_doc.setdefault((family, doc), []).append(float(logp[i][p, tail]))
        return {f: np.mean([np.mean(v) for (fam, _), v in per_doc.items() if fam == f]) for f in ("kg", "syntax")}

    def icl_score(m) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(m(docs).logits, -1)
        rows = torch.arange(len(docs))
        return float((logp[rows, early - 1, docs[:, early]] - logp[rows, late - 1, docs[:, late]]).mean())

    def task_metrics(m) -> dict[tuple[str, str], float]:
        rows = evaluate_tasks(m, tokenizer, tasks=tasks, shots=[shots], n_prompts=n_prompts, batch_size=4)
        return {(r["task"], r["metric"]): r["value"] for r in rows
                if r["metric"] in ("format_compliance", "accuracy_constrained")}

    clean = recall(model), icl_score(model), task_metrics(model)
    _, icl_row = loss_reduction(per_token_losses(model, docs), early=early, late=late)
    assert icl_row["value"] == pytest.approx(clean[1], abs=1e-6)  # the ICL score as icl.py defines it
    task_changes = 0
    for layer, head in itertools.product(range(2), range(4)):
        mine = got[(got["layer"] == layer) & (got["head"] == head)]
        ref = [recall(edited(model, [(layer, head)], means["relation_recall"])),
               icl_score(edited(model, [(layer, head)], means["loss_reduction"])),
               task_metrics(edited(model, [(layer, head)], means["tasks"]))]
        for family in ("kg", "syntax"):
            r = row(mine, metric="tail_logprob", task=family)
            assert (r["baseline"], r["value"]) == pytest.approx((clean[0][family], ref[0][family] - clean[0][family]),
                                                                abs=tol)
        r = row(mine, metric="icl_score")
        assert (r["baseline"], r["value"]) == pytest.approx((clean[1], ref[1] - clean[1]), abs=tol)
        for (task, metric), value in ref[2].items():
            r = row(mine, metric=metric, task=task)
            base = clean[2][task, metric]
            assert (r["baseline"], r["value"]) == pytest.approx((base, value - base), abs=1e-12)
            task_changes += value != base
        assert row(mine, metric="tail_logprob", task="kg")["events"] == sum(e[4] == "kg" for e in events)
    assert task_changes > 0  # some head flips some prompt: the task comparison is not vacuous
    cost = got.attrs["cost"]
    assert cost.passes < cost.unshared_passes  # layer-1 ablations skip layer 0


@pytest.mark.pythia_format
def test_ablation_on_a_pythia_checkpoint_through_the_pipelines_loaders(pythia_cache):
    """The real format: a Pythia-format checkpoint and the GPT-NeoX tokenizer, both from load_checkpoint.
    Each head's effect on the ICL score and on the tasks equals a forward pass of a weight-edited copy."""
    from conftest import PYTHIA_MODEL

    ckpt = load_checkpoint(PYTHIA_MODEL, 1000, cache_dir=pythia_cache, device="cpu")
    model, tokenizer = ckpt.model, ckpt.tokenizer
    heads = [(0, 1), (1, 2)]
    docs = torch.randint(100, 50_000, (4, 40), generator=torch.Generator().manual_seed(0))
    early, late, tasks = 5, 30, (TASKS[0],)
    sets = [icl_score_set(docs, early=early, late=late), icl_task_set(tokenizer, shots=2, n_prompts=6, tasks=tasks)]
    got = head_ablation_effects(model, sets, heads=heads, batch_size=3, n_boot=20, keep_first=False)
    prompts = [tokenizer.encode(p.text, add_special_tokens=False) for p in make_prompts(tasks[0], 2, 6, 0)]
    means = {"icl": dense_inputs(model, docs[:, :late].tolist()), "tasks": dense_inputs(model, prompts)}

    def icl_score(m) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(m(docs).logits.double(), -1)
        rows = torch.arange(len(docs))
        return float((logp[rows, early - 1, docs[:, early]] - logp[rows, late - 1, docs[:, late]]).mean())

    def compliance(m) -> float:
        rows = evaluate_tasks(m, tokenizer, tasks=tasks, shots=[2], n_prompts=6, batch_size=4)
        return next(r["value"] for r in rows if r["metric"] == "format_compliance")

    clean = icl_score(model)
    for head in heads:
        r = row(got[(got["layer"] == head[0]) & (got["head"] == head[1])], metric="icl_score")
        assert (r["baseline"], r["value"]) == pytest.approx(
            (clean, icl_score(edited(model, [head], means["icl"])) - clean), abs=1e-4)
        r = row(got[(got["layer"] == head[0]) & (got["head"] == head[1])], metric="format_compliance")
        assert r["value"] == pytest.approx(compliance(edited(model, [head], means["tasks"])) - r["baseline"], abs=1e-12)
    assert got.loc[got["metric"] == "icl_score", "value"].abs().max() > 1e-4  # not vacuous


# ----------------------------------------------------------------------------- a hand-built copy circuit


def copy_model(copy_scale: float = 5.0) -> GPTNeoXForCausalLM:
    """One layer, four heads, vocabulary of 8. Head 0 attends to the previous token (constant Q and K
    biases in the two rotary dimensions: the score a^2 cos(1 + k - q) peaks at k = q - 1 for sequences of at
    most 7 tokens) and copies it into residual dims 8..15, the only dims the unembedding reads; heads 1-3
    attend and write at random into dims 16..31; the MLP is zero. Only head 0 can predict a copy."""
    config = GPTNeoXConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=16, max_position_embeddings=16, rotary_pct=0.25, rotary_emb_base=100,
                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    model = GPTNeoXForCausalLM(config).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in (model.gpt_neox.final_layer_norm, *(m for m in model.modules() if isinstance(m, torch.nn.LayerNorm))):
            ln.weight.fill_(1.0)
        model.gpt_neox.embed_in.weight[:, :8] = 10 * torch.eye(8, dtype=torch.float64)
        att = model.gpt_neox.layers[0].attention
        qkv_w = att.query_key_value.weight.view(4, 3, 8, 32)  # [heads, (q, k, v), d_head, d_model]
        qkv_b = att.query_key_value.bias.view(4, 3, 8)
        a = 12.0
        qkv_b[0, 0, :2] = torch.tensor([a, 0.0])
        qkv_b[0, 1, :2] = a * torch.tensor([math.cos(1.0), math.sin(1.0)])
        qkv_w[0, 2, :, :8] = torch.eye(8, dtype=torch.float64)  # V: the token's (normalised) one-hot
        att.dense.weight[8:16, :8] = copy_scale * torch.eye(8, dtype=torch.float64)
        qkv_w[1:] = 0.5 * torch.randn(3, 3, 8, 32, generator=gen, dtype=torch.float64)
        att.dense.weight[16:32, 8:32] = 0.3 * torch.randn(16, 24, generator=gen, dtype=torch.float64)
        model.get_output_embeddings().weight[:, 8:16] = 3 * torch.eye(8, dtype=torch.float64)
    return model


def copy_relations(model):
    """Relation recall for :func:`copy_model`: every ordered pair (a, b) of tokens 1..7 as "a b a b a b", one
    forward triplet (a, b) per document, so b recurs at positions 3 and 5."""
    seqs, trips = [], []
    for i, (a, b) in enumerate(itertools.permutations(range(1, 8), 2)):
        seqs.append(dict(sequence_id=i, document_id=i, source="t", unit="abstract", family="kg", text="",
                         token_ids=[a, b, a, b, a, b], function_mask=[False] * 6))
        trips += [dict(sequence_id=i, family="kg", relation="r", category="c", direction=d, s=s, o=o, head_id=h,
                       tail_id=t, head_str="", tail_str="") for d, s, o, h, t in (("forward", 0, 1, a, b),
                                                                                   ("reverse", 1, 0, b, a))]
    return relation_recall_set(model.config, pd.DataFrame(seqs), pd.DataFrame(trips))


def test_a_hand_built_copy_head_carries_recall_and_a_neutral_head_does_not():
    model = copy_model()
    evaluation = copy_relations(model)
    got = head_ablation_effects(model, [evaluation], n_boot=200).set_index("head")
    assert (got["events"] == 2 * 42).all() and (got["n"] == 42).all()  # b at positions 3 and 5, 42 documents
    assert got.loc[0, "baseline"] > -1e-3  # the circuit recalls the tail almost surely
    assert got.loc[0, "value"] < -1.0 and got.loc[0, "ci_high"] < -1.0  # ablating the copy head loses it
    assert got.loc[[1, 2, 3], "value"].abs().max() < 1e-4  # heads off the path change nothing


# ----------------------------------------------------------------------------- groups, controls, table


def test_groups_get_layer_matched_controls_and_the_rows_fit_the_schema():
    model = tiny_neox(seed=2)
    evaluation = icl_score_set(torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0)),
                               early=2, late=12)
    group, full = [(0, 1), (1, 0), (1, 3)], [(0, 0), (0, 1), (0, 2)]  # layer 0 has one head outside ``full``
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = group_ablation_effects(model, [evaluation], {"sih": group, "induction": [], "full": full}, draws=3,
                                     seed=7)
    assert sorted(str(w.message).split(":")[0] for w in caught) == [
        "group 'full'", "group 'induction' has no heads; left out"]
    assert list(got["ablation"]) == ["group", "control", "control", "control", "group", "importance"]
    assert list(got["group"]) == ["sih"] * 4 + ["full", "sih"]
    # the group's importance over its controls: per unit the group's effect minus the controls' mean, so its
    # value is the same difference of means (its interval comes from resampling them together)
    sih = got[got["group"] == "sih"].set_index("ablation")
    controls_mean = got.loc[(got["group"] == "sih") & (got["ablation"] == "control"), "value"].mean()
    assert sih.loc["importance", "value"] == pytest.approx(sih.loc["group", "value"] - controls_mean)
    assert sih.loc["importance", "heads"] == sih.loc["group", "heads"]
    for heads in got.loc[got["ablation"] == "control", "heads"]:
        layers = sorted(int(h[1]) for h in heads)
        assert layers == [0, 1, 1] and not set(heads) & {"L0H1", "L1H0", "L1H3"}
    again = group_ablation_effects(model, [evaluation], {"sih": group}, draws=3, seed=7)
    assert list(again["heads"]) == list(got["heads"][:4]) + [got["heads"][0]]  # seeded (the last: importance)
    rng = np.random.default_rng(0)
    assert {tuple(layer_matched_heads([(1, 2)], 4, rng)) for _ in range(30)} == {((1, 0),), ((1, 1),), ((1, 3),)}
    few = group_ablation_effects(model, [evaluation], {"a": [(1, 0), (1, 1)], "b": [(0, 2)]}, draws=5)
    controls = few[few["ablation"] == "control"]
    assert list(controls["heads"][controls["group"] == "a"]) == [["L1H2", "L1H3"]]  # the only one there is
    assert sorted(map(tuple, controls["heads"][controls["group"] == "b"])) == [("L0H0",), ("L0H1",), ("L0H3",)]
    # the stage's one-pass table (every head exact) equals the two calls on their own, after the screen's rows
    both = ablation_table(model, [evaluation], {"sih": group}, exact_heads=None, draws=3, seed=7)
    assert list(both["method"]) == ["attribution"] * 8 + ["exact"] * (len(both) - 8)
    both = both[both["method"] == "exact"].reset_index(drop=True)
    alone = pd.concat([head_ablation_effects(model, [evaluation], seed=7), again], ignore_index=True)
    pd.testing.assert_frame_equal(both.drop(columns="group"), alone.drop(columns="group"), check_dtype=False)
    assert list(both["group"].fillna("")) == list(alone["group"].fillna(""))
    stamped = [{"model": "m", "step": 1, "tokens": 2, **r} for r in got.to_dict("records")]
    assert to_table(stamped, ABLATION_SCHEMA).num_rows == len(got)
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "prefix_matching": [0.1, 0.9, 0.5, 0.8]})
    assert top_induction_heads(heads, 2) == [(0, 1), (1, 1)]
    ri = pd.DataFrame({"layer": [0, 1, 1], "head": [1, 0, 2], "gate": ["argmax", "argmax", "margin"],
                       "variant": ["source"] * 3, "sih": [True, False, True]})
    assert flagged_sih_heads(ri) == [(0, 1)]
    with pytest.raises(ValueError, match=r"no rows with gate='argmax' variant='literal' \(it has \[\('argmax', "):
        flagged_sih_heads(ri, variant="literal")


# ----------------------------------------------------------------------------- the toy zoo


def test_toy_zoo_induction_heads_carry_the_icl_score(toy_zoo):
    """At the last step the ICL score (loss at token 60 minus token 4) is about -1.5 nats, about 0 at step 0.
    Mean-ablating the layer-1 induction heads removes most of that drop; so does the previous-token head of
    layer 0 they compose with (part of the same circuit), while no set of the other layer-0 heads does.

    The induction heads are all four heads of layer 1, so no layer-matched control exists; the null is every
    set of layer-0 heads that are not previous-token heads (chosen by the heads table, not by their effect),
    all 7 of them rather than seeded draws."""
    cache = toy_zoo / "hub"
    last = load_checkpoint(TOY_MODEL_ID, TOY_STEPS[-1], cache_dir=cache, device="cpu")
    first = load_checkpoint(TOY_MODEL_ID, 0, cache_dir=cache, device="cpu")
    texts = iter_texts(TextSource("jsonl", path=str(toy_zoo / "text.jsonl")))
    docs = torch.tensor([d["token_ids"] for d in select_documents(texts, last.tokenizer, context=64, n_docs=100,
                                                                  seed=0)])
    early, late = 4, 60  # config/toy.yaml
    _, start = loss_reduction(per_token_losses(first.model, docs), early=early, late=late, n_boot=10)
    heads = pd.DataFrame(induction_rows(last.model, last.tokenizer, Probe(n_tokens=15)))
    induction = top_induction_heads(heads, int((heads["prefix_matching"] > 0.5).sum()))
    assert induction and all(layer == 1 for layer, _ in induction)
    layer0 = heads[heads["layer"] == 0]
    previous = [(0, int(h)) for h in layer0.loc[layer0["previous_token"] > 0.5, "head"]]
    others = [int(h) for h in layer0.loc[layer0["previous_token"] <= 0.5, "head"]]
    null = {f"layer0:{combo}": [(0, h) for h in combo]
            for k in range(1, len(others) + 1) for combo in itertools.combinations(others, k)}
    got = group_ablation_effects(last.model, [icl_score_set(docs, early=early, late=late)],
                                 {"induction": induction, "previous_token": previous, **null}, draws=0, n_boot=200)
    drop = row(got, group="induction")["baseline"] - start["value"]
    assert drop < -1.0
    removed = {name: -value / drop for name, value in zip(got["group"], got["value"])}
    assert removed["induction"] > 0.5  # measured: 0.997 (ICL score -1.489 -> -0.008; step 0: -0.003)
    assert removed["previous_token"] > 0.5  # measured: 0.991 (L0H2)
    false_positives = [name for name in null if removed[name] > 0.5]
    assert len(null) == 7 and not false_positives  # measured: 0 of 7; shares -0.17 .. 0.06


@pytest.mark.parametrize("family", ["gpt-neox", "olmo", "olmo2"])
def test_ablation_removes_exactly_the_heads_that_write(family):
    """Planted on every family: only head (1, 2) writes anything (every other head's W_O is zero), so mean-
    ablating any other head changes nothing, to rounding, while ablating (1, 2) changes the ICL score; ablating
    every head of a layer whose heads write nothing is no change either."""
    model = (tiny_neox(seed=7, initializer_range=0.5) if family == "gpt-neox" else
             tiny_model(family, seed=7, initializer_range=0.5, clip_qkv=4.0)).double()
    d_head = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in range(2):
            projection = output_projection(model, layer)
            keep = projection.weight[:, 2 * d_head:3 * d_head].clone()
            projection.weight.zero_()
            if layer == 1:
                projection.weight[:, 2 * d_head:3 * d_head] = keep
    docs = torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(2))
    evaluation = icl_score_set(docs, early=3, late=20)
    got = head_ablation_effects(model, [evaluation], batch_size=3, n_boot=50)
    writing = row(got, layer=1, head=2)["value"]
    others = got[~((got["layer"] == 1) & (got["head"] == 2))]["value"].abs().max()
    assert abs(writing) > 1e-3 and others < 1e-10, (writing, others)
    group = group_ablation_effects(model, [evaluation], {"layer0": [(0, h) for h in range(4)]}, draws=0, n_boot=50)
    assert abs(row(group, ablation="group")["value"]) < 1e-10
