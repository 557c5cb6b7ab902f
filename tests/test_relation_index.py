"""Relation index: production scoring against a slow float64 reference, hand-built heads, gate attention."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_neox
from families import head_logits, tiny_model

from icl_dynamics.attention import capture_attention, head_ov_weights
from icl_dynamics.io import to_table
from icl_dynamics.relation_index import (
    gate_statistics,
    ov_scores,
    score_relation_index,
)
from icl_dynamics.schemas import RELATION_INDEX_SCHEMA

KEY = ["layer", "head", "family", "relation", "direction", "gate", "variant"]
NUMERIC = ["ri", "ri_se", "events", "passes", "opportunities", "pass_rate", "ri_per_opportunity", "triplets",
           "triplets_qualified", "control_matched", "control_matched_events", "control_tenth", "control_tenth_events",
           "control_random", "control_random_events", "effect", "effect_se", "effect_tenth", "effect_tenth_se",
           "effect_random", "effect_random_se", "clusters", "effective_clusters", "p_value", "p_adjusted"]
FAMILIES = ("kg-letters", "kg-letters", "kg-letters", "kg", "kg", "kg", "syntax", "syntax")  # of triplet r


# ----------------------------------------------------------------------------- inputs by hand


def random_inputs(seed: int, vocab: int, n_seq: int = 6) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sequences with repeated ids and random function-word marks; triplets of three families (each with its
    own matched-control rule; kg-letters a negative control under literal and source), both directions."""
    rng = np.random.default_rng(seed)
    seqs, trips = [], []
    for i in range(n_seq):
        sid = 100 + 7 * i  # ids that are neither 0.. nor contiguous
        n = int(rng.integers(8, 34))
        toks = rng.integers(0, vocab // 2, n)  # small id range: repeats, so C_j differs from positions
        mask = rng.random(n) < 0.25
        seqs.append(dict(sequence_id=sid, document_id=i // 2 if i < 4 else i, source="test", unit="abstract",
                         family="kg", text="", token_ids=toks.tolist(), function_mask=mask.tolist()))
        for r in range(8):
            s, o = (int(x) for x in rng.choice(n, 2, replace=False))
            direction = "forward" if r % 2 == 0 else "reverse"
            head, tail = int(toks[s]), int(toks[o])
            if direction == "reverse" and r % 4 == 1:  # the contract allows either id order for reverse rows
                head, tail = tail, head
            trips.append(dict(sequence_id=sid, family=FAMILIES[r], relation=f"R{r % 3}",
                              category="c", direction=direction, s=s, o=o, head_id=head, tail_id=tail,
                              head_str="", tail_str=""))
    return pd.DataFrame(seqs), pd.DataFrame(trips)


# ----------------------------------------------------------------------------- slow reference


def rotary(x: torch.Tensor, theta: float, dims: int) -> torch.Tensor:
    """GPT-NeoX rotary on the first ``dims`` features of x [n, heads, d_head] (positions 0..n-1)."""
    inv = 1.0 / theta ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    ang = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rot, rest = x[..., :dims], x[..., dims:]
    half = torch.cat([-rot[..., dims // 2:], rot[..., : dims // 2]], -1)
    return torch.cat([rot * cos.to(x.dtype) + half * sin.to(x.dtype), rest], -1)


def hand_attention(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention [heads, n, n] recomputed from Q and K of the layer's input."""
    cfg = model.config
    heads, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    dims = int(d_head * cfg.rope_parameters["partial_rotary_factor"])
    with torch.no_grad():
        hidden = model(tokens[None], output_hidden_states=True).hidden_states
        out = []
        for layer, block in enumerate(model.gpt_neox.layers):
            qkv = block.attention.query_key_value(block.input_layernorm(hidden[layer][0]))
            q, k, _ = qkv.view(len(tokens), heads, 3 * d_head).chunk(3, -1)
            theta = cfg.rope_parameters["rope_theta"]
            q, k = rotary(q, theta, dims), rotary(k, theta, dims)
            scores = torch.einsum("qhe,khe->hqk", q, k) / math.sqrt(d_head)
            causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
            out.append(torch.softmax(scores.masked_fill(~causal, -math.inf), -1))
    return out


def head_vocab_probs(model, tokens: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Full-vocabulary softmax of each head's OV output [heads, n, vocab] for each variant input."""
    cfg = model.config
    heads, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    block = model.gpt_neox.layers[layer]
    qkv = block.attention.query_key_value
    with torch.no_grad():
        hidden = model(tokens[None], output_hidden_states=True).hidden_states[layer][0]
        raw = torch.nn.functional.linear(model.gpt_neox.embed_in(tokens), qkv.weight)  # no bias
        ctx = qkv(block.input_layernorm(hidden))  # with bias
        probs = {}
        for name, pre in (("raw", raw), ("contextual", ctx)):
            v = pre.view(len(tokens), heads, 3 * d_head)[..., 2 * d_head:]  # transformers' chunk(3)
            per_head = []
            for h in range(heads):
                spread = torch.zeros(len(tokens), heads, d_head, dtype=v.dtype)
                spread[:, h] = v[:, h]
                out = torch.nn.functional.linear(spread.reshape(len(tokens), -1), block.attention.dense.weight)
                per_head.append(torch.softmax(model.get_output_embeddings()(out), -1))
            probs[name] = torch.stack(per_head)
    return probs


def head_probabilities(model, tokens: torch.Tensor, layer: int):
    """``probability(kind, head, position of x, query j)``: a head's full-vocabulary softmax for the raw or
    contextual x at a position, written at query j: GPT-NeoX's by :func:`head_vocab_probs`, OLMo's by
    :func:`families.head_logits` (OLMo-2: the post-attention norm's gain and its real 1 / RMS at j)."""
    if model.config.model_type == "gpt_neox":
        probs = head_vocab_probs(model, tokens, layer)
        return lambda kind, h, pos, j: probs[kind][h, pos]
    logits = head_logits(model, tokens, layer)
    return lambda kind, h, pos, j: torch.softmax(logits[kind][h, pos] * logits["scale"][j], -1)


def model_attention(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention [heads, n, n] as the model itself computes it (eager)."""
    with torch.no_grad():
        return [a[0].double() for a in model(tokens[None], output_attentions=True).attentions]


def reference_position(ids: list[int], token: int, s: int) -> int:
    """Position class by its definition: 0 if the token's last occurrence before s (after the BOS at 0)
    is s - 1, 1 if s - 2, 2 if 3-4 back, 3 if 5-8 back, ...; -1 if it occurs only after s."""
    before = [k for k in range(1, s) if ids[k] == token]
    if not before:
        return -1
    distance = s - before[-1]
    return next(c for c in range(64) if distance <= 2**c)


def reference_matched(ids: list[int], rows: pd.DataFrame, order: list[int], content: list[bool], seed: int,
                      sequence_id: int, by_position: bool = False) -> dict[int, int | None]:
    """Each triplet's matched control by its definition: a token of the tail's kind (any kg-letters
    entity letter; a kg tail of the same direction; a syntax tail of the same label and direction),
    neither the triplet's head nor tail nor linked to the head by any triplet, visible at max(s, o)
    (``by_position``: also in the tail's position class relative to s); uniform in order of first
    appearance."""
    rng = np.random.default_rng([seed, sequence_id, 2 if by_position else 1])
    links = [(ids[r.s], ids[r.o]) for r in rows.itertuples()]
    out = {}
    for t in rows.itertuples():
        same_kind = [r for r in rows.itertuples() if r.family == t.family and r.direction == t.direction
                     and (t.family in ("kg", "kg-letters") or r.relation == t.relation)]
        if t.family == "kg-letters":
            same_kind = [r for r in rows.itertuples() if r.family == t.family]
        kind = {ids[r.o] for r in same_kind} | ({ids[r.s] for r in same_kind} if t.family == "kg-letters" else set())
        linked = {b for a, b in links if a == ids[t.s]} | {a for a, b in links if b == ids[t.s]}
        horizon = max(t.s, t.o)
        visible = [c for c in order if any(ids[k] == c and content[k] for k in range(horizon + 1))]
        eligible = [c for c in visible if c in kind and c not in linked | {ids[t.s], ids[t.o]}]
        if by_position:
            eligible = [c for c in eligible if reference_position(ids, c, t.s) == reference_position(ids, ids[t.o], t.s)]
        out[t.Index] = eligible[int(rng.integers(len(eligible)))] if eligible else None
    return out


def reference_cr2(values: list[float], clusters: list) -> tuple[float, float]:
    """CR2 variance and Bell-McCaffrey degrees of freedom of the mean of ``values`` clustered by
    ``clusters``, by the matrix definitions (Bell & McCaffrey 2002; Imbens & Kolesar 2016): the
    intercept-only regression y = mu + e, A_g = (I - H_gg)^(-1/2), V = sum_g (X_g' A_g e_g)^2 / N^2,
    df = (sum lambda)^2 / sum lambda^2 over the eigenvalues of G'G, G_g = (I - H)_g' A_g X_g / N."""
    y, n = np.asarray(values, float), len(values)
    hat = np.full((n, n), 1.0 / n)
    residual = y - y.mean()
    meat, columns = 0.0, []
    for g in dict.fromkeys(clusters):
        idx = [i for i, c in enumerate(clusters) if c == g]
        w, v = np.linalg.eigh(np.eye(len(idx)) - hat[np.ix_(idx, idx)])
        a_g = v @ np.diag(w ** -0.5) @ v.T
        meat += (np.ones(len(idx)) @ a_g @ residual[idx]) ** 2
        columns.append((np.eye(n) - hat)[:, idx] @ a_g @ np.ones(len(idx)) / n)
    lam = np.linalg.eigvalsh(np.stack(columns, 1).T @ np.stack(columns, 1))
    return meat / n**2, lam.sum() ** 2 / (lam**2).sum()


def reference_test(events: list[tuple[int, tuple[int, int], float]]) -> tuple[float, float, float, int, float]:
    """Mean, two-way cluster-robust SE (documents and token pairs: the sum of each way's CR2
    variance), one-sided p (t with the smaller Bell-McCaffrey df), the smaller cluster count and the
    smaller Kish effective count of (document, pair, value) events, with explicit loops and matrices."""
    from scipy import stats as st

    n_total = len(events)
    mean = sum(v for _, _, v in events) / n_total if n_total else math.nan
    variance, g, df, kish = 0.0, math.inf, math.inf, math.inf
    for way in (0, 1):
        sizes = Counter(event[way] for event in events)
        g = min(g, len(sizes))
        kish = min(kish, n_total**2 / sum(c * c for c in sizes.values())) if sizes else 0.0
        if len(sizes) >= 2:
            v, d = reference_cr2([e[2] for e in events], [e[way] for e in events])
            variance, df = variance + v, min(df, d)
    if g < 2:
        return mean, math.nan, math.nan, int(g) if g < math.inf else 0, kish if kish < math.inf else 0.0
    se = math.sqrt(variance)
    p = st.t.sf(mean / se, df) if se > 0 else (0.0 if mean > 0 else 1.0)
    return mean, se, p, int(g), kish


def reference_holm(p: dict) -> dict:
    """Holm by its definition: the k-th smallest p times (m - k + 1), made monotone, capped at 1."""
    ordered = sorted(p, key=lambda key: p[key])
    m, out, running = len(ordered), {}, 0.0
    for k, key in enumerate(ordered):
        running = max(running, min(1.0, (m - k) * p[key]))
        out[key] = running
    return out


def reference_rows(model, seqs: pd.DataFrame, trips: pd.DataFrame, *, tau: float, exclude: bool,
                   control_position: int, seed: int, alpha: float, min_clusters: int) -> pd.DataFrame:
    """The relation index by its definition: explicit loops over heads, triplets and query positions."""
    cfg = model.config
    acc: dict[tuple, dict[str, list]] = {}
    opp: dict[tuple, int] = {}
    trip_count: dict[tuple, int] = {}
    for seq in seqs.itertuples():
        start = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_id  # OLMo: no BOS, its EOS
        ids = [start, *seq.token_ids]  # BOS prepended: every position moves by one
        fmask = [True, *seq.function_mask]
        toks = torch.tensor(ids)
        n = len(ids)
        content = [k > 0 and not (exclude and fmask[k]) for k in range(n)]  # the BOS is never a candidate
        attn = hand_attention(model, toks) if cfg.model_type == "gpt_neox" else model_attention(model, toks)
        order = []  # candidates in order of first content appearance
        for k in range(n):
            if content[k] and ids[k] not in order:
                order.append(ids[k])
        tenth_pos = next((k for k in range(min(control_position + 1, n - 1), n) if content[k]), None)
        draws = np.random.default_rng([seed, seq.sequence_id]).random(n)
        rows = trips[trips.sequence_id == seq.sequence_id].assign(s=lambda r: r.s + 1, o=lambda r: r.o + 1)
        matched = reference_matched(ids, rows, order, content, seed, seq.sequence_id)
        matched_position = reference_matched(ids, rows, order, content, seed, seq.sequence_id, by_position=True)
        for layer in range(cfg.num_hidden_layers):
            probability = head_probabilities(model, toks, layer)
            for t in rows.itertuples():
                group = (t.family, t.relation, t.direction)
                tail, head_tok = ids[t.o], ids[t.s]
                counted = False
                for j in range(max(t.s, t.o), n):
                    cands = [ids[k] for k in range(j + 1) if content[k]]
                    cset = sorted(set(cands))
                    if tail not in cset:
                        continue
                    if layer == 0:
                        opp[group] = opp.get(group, 0) + 1
                        if not counted:
                            trip_count[group] = trip_count.get(group, 0) + 1
                            counted = True
                    visible_order = [c for c in order if c in cset]
                    rand_target = visible_order[int(math.floor(draws[j] * len(visible_order)))]
                    for h in range(cfg.num_attention_heads):
                        row = attn[layer][h, j, : j + 1]
                        others = torch.cat([row[: t.s], row[t.s + 1:]])
                        best_other = others.max().item() if len(others) else 0.0
                        for gate in ("argmax", "margin"):
                            ok = row[t.s].item() > best_other
                            if gate == "margin":
                                ok = ok and row[t.s].item() / best_other > tau if best_other > 0 else ok
                            for variant in ("literal", "source", "contextual"):
                                stats = acc.setdefault((layer, h, *group, gate, variant),
                                                       dict(a=[], tenth=[], rand=[], matched=[], passes=0,
                                                            trips=set(), d_ri=[], d_tenth=[], d_rand=[],
                                                            d_matched=[]))
                                if not ok:
                                    continue
                                stats["passes"] += 1
                                src = {"literal": ("raw", j), "source": ("raw", t.s), "contextual": ("contextual", t.s)}
                                kind, pos = src[variant]
                                p = probability(kind, h, pos, j)  # full vocabulary
                                pc = {c: p[c].item() for c in cset}
                                mean = sum(pc.values()) / len(pc)
                                q = {c: max(0.0, pc[c] - mean) for c in cset}
                                total = sum(q.values())
                                if total == 0:
                                    continue
                                banned = {tail, head_tok} | ({ids[j]} if variant == "literal" else set())
                                if variant == "literal" and ids[j] == tail:
                                    continue  # a self-copying head would raise the tail here
                                a = q[tail] / total
                                stats["a"].append(a)
                                stats["trips"].add(t.Index)
                                pair = (ids[t.s], ids[t.o])
                                stats["d_ri"].append((seq.document_id, pair, a))
                                by_kind = matched_position if variant == "contextual" else matched
                                targets = {"rand": rand_target, "matched": by_kind[t.Index],
                                           "tenth": ids[tenth_pos] if tenth_pos is not None and j >= tenth_pos
                                           else None}
                                for name, target in targets.items():
                                    if target is not None and target not in banned:
                                        stats[name].append(q[target] / total)
                                        stats[f"d_{name}"].append((seq.document_id, pair, a - q[target] / total))
    out = []
    tests = {}
    for key, st in acc.items():
        _, ri_se, _, _, _ = reference_test(st["d_ri"])
        each = [reference_test(st[f"d_{name}"]) for name in ("matched", "tenth", "rand")]
        p = math.nan if any(math.isnan(e[2]) for e in each) else max(e[2] for e in each)
        kish = min(e[4] for e in each)
        tests[key] = dict(ri_se=ri_se, effect=each[0][0], effect_se=each[0][1], effect_tenth=each[1][0],
                          effect_tenth_se=each[1][1], effect_random=each[2][0], effect_random_se=each[2][1],
                          p_value=p, clusters=min(e[3] for e in each), effective_clusters=kish,
                          tested=min(e[3] for e in each) >= min_clusters and not math.isnan(p),
                          negative=key[2] == "kg-letters" and key[-1] in ("literal", "source"))
    adjusted = {}
    for gate in ("argmax", "margin"):
        for variant in ("literal", "source", "contextual"):
            for negative in (False, True):  # the negative controls are a Holm family of their own
                family_p = {k: t["p_value"] for k, t in tests.items()
                            if k[-2:] == (gate, variant) and t["tested"] and t["negative"] == negative}
                adjusted.update(reference_holm(family_p))
    for (layer, h, family, relation, direction, gate, variant), st in acc.items():
        group = (family, relation, direction)
        test = tests[(layer, h, family, relation, direction, gate, variant)]
        p_adj = adjusted.get((layer, h, family, relation, direction, gate, variant), math.nan)
        negative = test.pop("negative")
        status = ("insufficient" if not test.pop("tested") else "negative control" if negative
                  else "sih" if p_adj < alpha else "not significant")
        a = np.array(st["a"])
        o = opp.get(group, 0)
        c10 = np.mean(st["tenth"]) if st["tenth"] else math.nan
        cr = np.mean(st["rand"]) if st["rand"] else math.nan
        ri = a.mean() if len(a) else math.nan
        out.append(dict(layer=layer, head=h, family=family, relation=relation, direction=direction, gate=gate,
                        variant=variant, ri=ri, ri_se=test.pop("ri_se"),
                        events=len(a), passes=st["passes"], opportunities=o,
                        pass_rate=st["passes"] / o if o else math.nan,
                        ri_per_opportunity=a.sum() / o if o else math.nan,
                        triplets=trip_count.get(group, 0), triplets_qualified=len(st["trips"]),
                        control_matched=np.mean(st["matched"]) if st["matched"] else math.nan,
                        control_matched_events=len(st["matched"]),
                        control_tenth=c10, control_tenth_events=len(st["tenth"]), control_random=cr,
                        control_random_events=len(st["rand"]), **test, p_adjusted=p_adj, sih_status=status,
                        sih=status == "sih", negative_control=negative,
                        negative_control_flagged=negative and status == "negative control" and p_adj < alpha))
    return pd.DataFrame(out)


def sharp(family: str = "gpt-neox"):
    """A random tiny model of ``family`` in float64 whose large weights make some heads' attention peaked,
    with random biases (GPT-NeoX) and norm gains (transformers initialises them to 0 and 1, which would hide
    a dropped b_V or gain)."""
    if family == "olmo":  # clip_qkv clamps about a third of the values (and of the queries and keys)
        return tiny_model(family, vocab_size=48, initializer_range=0.6, seed=3, clip_qkv=3.0).double()
    if family == "olmo2":  # QK-norm bounds the attention logits: larger q/k gains make some heads peaked
        model = tiny_model(family, vocab_size=48, initializer_range=0.25, seed=3).double()
        with torch.no_grad():
            for block in model.model.layers:
                block.self_attn.q_norm.weight.mul_(3.0)
                block.self_attn.k_norm.weight.mul_(3.0)
        return model
    model = tiny_neox(vocab_size=48, initializer_range=0.25, seed=3).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def sharp_model():
    return sharp()


@pytest.mark.parametrize(
    "family, exclude, control_position, batch_size, tau",
    [("gpt-neox", True, 10, 4, 2.2), ("gpt-neox", False, 3, 1, 1.5), ("olmo", True, 10, 4, 2.2),
     ("olmo2", False, 3, 3, 1.5)],
)
def test_matches_slow_reference(family, exclude, control_position, batch_size, tau):
    """Every family against the reference: patterns by hand (GPT-NeoX) or the model's own (OLMo), OV outputs
    written out from the real modules in float64 (families.head_logits for OLMo)."""
    sharp_model = sharp(family)
    seqs, trips = random_inputs(seed=11, vocab=48, n_seq=10)
    params = dict(tau=tau, control_position=control_position, seed=5, alpha=0.05, min_clusters=2)
    got = pd.DataFrame(score_relation_index(sharp_model, pd.DataFrame(seqs), trips, exclude_function_words=exclude,
                                            batch_size=batch_size, **params))
    want = reference_rows(sharp_model, seqs, trips, exclude=exclude, **params)
    merged = want.merge(got, on=KEY, suffixes=("_want", "_got"), validate="one_to_one")
    assert len(merged) == len(got) == len(want) == 2 * 4 * 8 * 2 * 3  # layers, heads, groups, gates, variants
    for col in NUMERIC:
        np.testing.assert_allclose(merged[f"{col}_got"].astype(float), merged[f"{col}_want"].astype(float),
                                   rtol=0, atol=1e-6, equal_nan=True, err_msg=col)
    for col in ("sih_status", "negative_control", "negative_control_flagged"):
        assert (merged[f"{col}_got"] == merged[f"{col}_want"]).all(), col
    assert {"insufficient", "not significant"} <= set(got["sih_status"])
    # the comparison means something: both gates fire, margin less often, and the variants differ
    events = got.groupby("gate")["events"].sum()
    assert events["argmax"] > events["margin"] > 20
    assert got.groupby("variant")["ri"].mean().nunique() == 3
    assert (got["control_tenth_events"] > 0).any() and got["p_adjusted"].notna().sum() > 10
    # every matched-control rule is exercised: by position, the contextual variant keeps fewer controls
    matched = got.groupby(["family", "variant"])["control_matched_events"].sum()
    assert 0 < matched["kg", "contextual"] < matched["kg", "source"] and matched["kg-letters", "source"] > 0
    assert (got["sih_status"] == "negative control").any() and not got.loc[got["negative_control"], "sih"].any()


def test_rows_fit_schema(sharp_model):
    seqs, trips = random_inputs(seed=2, vocab=48, n_seq=2)
    rows = score_relation_index(sharp_model, seqs, trips, gates=("margin",), variants=("source",))
    table = to_table([{**r, "model": "tiny", "step": 0, "tokens": 0} for r in rows], RELATION_INDEX_SCHEMA)
    assert set(table.column("gate").to_pylist()) == {"margin"} and table.column("tau").to_pylist()[0] == 2.2


# ----------------------------------------------------------------------------- pieces


def test_gate_attention_matches_transformers_eager():
    model = tiny_neox(vocab_size=64, initializer_range=0.1, seed=1)  # float32, as scored on CPU
    toks = torch.tensor(np.random.default_rng(0).integers(0, 64, 40))
    hand = hand_attention(model.double(), toks)
    model.float()
    captured = {}
    with torch.no_grad():
        eager = model(toks[None], output_attentions=True).attentions
        with capture_attention(model, lambda layer, p: captured.__setitem__(layer, p[0])):
            model.gpt_neox(input_ids=toks[None])
    for layer in range(2):
        torch.testing.assert_close(eager[layer][0].double(), hand[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(captured[layer].double(), hand[layer], atol=1e-5, rtol=0)
        arg, top, second = gate_statistics(captured[layer])
        sorted_hand = hand[layer].sort(-1, descending=True)
        torch.testing.assert_close(top.double(), sorted_hand.values[..., 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(second.double(), sorted_hand.values[..., 1], atol=1e-5, rtol=0)
        clear = sorted_hand.values[..., 0] - sorted_hand.values[..., 1] > 1e-4
        assert (arg[clear] == sorted_hand.indices[..., 0][clear]).all()


def test_head_ov_weights_reproduce_the_layer():
    model = tiny_neox(seed=4).double()
    attn, x = model.gpt_neox.layers[1].attention, torch.randn(5, 32, dtype=torch.float64)
    w_v, b_v, w_o = head_ov_weights(model, 1)
    v = attn.query_key_value(x).view(5, 4, 24)[..., 16:]  # transformers: view(heads, 3 * d_head).chunk(3)
    torch.testing.assert_close(torch.einsum("nd,hde->nhe", x, w_v) + b_v, v)
    mixed = torch.einsum("nhe,hed->nd", v, w_o) + attn.dense.bias
    torch.testing.assert_close(mixed, attn.dense(v.reshape(5, -1)))


def test_ov_scores_worked_example_and_normaliser():
    # method notes: p = (.30,.05,.05,.15,.05,.32,.08) over 7 visible ids -> a(Ben) = .177/.341
    p = torch.tensor([0.30, 0.05, 0.05, 0.15, 0.05, 0.32, 0.08], dtype=torch.float64)
    q = (p - p.mean()).clamp_min(0)
    a = ov_scores(p.log() + 3.0, torch.ones(7, dtype=torch.bool))  # any constant shift: normaliser cancels
    assert a[5].item() == pytest.approx(0.177143 / 0.341429, abs=1e-5)
    torch.testing.assert_close(a, q / q.sum())
    # ids outside C_j take no part: the same p among the first 4 ids only
    mask = torch.tensor([True] * 4 + [False] * 3)
    q4 = (p[:4] / p[:4].sum() - 0.25).clamp_min(0)
    torch.testing.assert_close(ov_scores(p.log(), mask)[:4], q4 / q4.sum())
    assert ov_scores(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.bool)).isnan().all()
    # picking targets of rows gives the same numbers as the full rows, and NaN for a negative target
    logits, cand = torch.randn(4, 9, dtype=torch.float64), torch.rand(4, 9) < 0.7
    cand[:, 0] = True
    rows, targets = torch.tensor([2, 0, 2, 3]), torch.tensor([[0, 5, -1], [1, 1, 8], [3, 0, 2], [7, 4, 6]])
    full = ov_scores(logits, cand)
    picked = ov_scores(logits, cand, rows, targets)
    torch.testing.assert_close(picked[targets >= 0], full[rows[:, None], targets][targets >= 0])
    assert picked[0, 2].isnan() and not picked[targets >= 0].isnan().any()


# ----------------------------------------------------------------------------- a head built by hand

T_S, T_O, T_X, T_FW = 1, 2, 3, 4  # head token, tail token, another token, a function word
T_C = 28  # the tail of an unrelated entity pair (T_X -> T_C)
SUBJECTS = (T_S, *range(16, 27))  # the relation's head tokens: with T_O, 12 distinct token pairs
VOCAB = 32


def handbuilt(writes: int) -> torch.nn.Module:
    """One layer; head 0 attends to the (only) occurrence of any of :data:`SUBJECTS` and writes
    ``writes``; heads 1-7 are zero (uniform attention: a tie, which never passes the gate)."""
    model = tiny_neox(vocab_size=VOCAB, hidden=64, layers=1, heads=8).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in (model.gpt_neox.layers[0].input_layernorm, model.gpt_neox.layers[0].post_attention_layernorm):
            ln.weight.fill_(1.0)
        emb = model.gpt_neox.embed_in.weight
        emb[:, :VOCAB] = torch.eye(VOCAB)
        emb[:, VOCAB] = 4.0  # a constant direction, read by the value
        qkv = model.gpt_neox.layers[0].attention.query_key_value
        # head 0 rows: q = 0..7, k = 8..15, v = 16..23 (layout [heads, (q, k, v), d_head]); d 7 is not rotated
        qkv.bias[7] = 1.0
        qkv.weight[8 + 7, list(SUBJECTS)] = 100.0
        qkv.weight[16 + 0, VOCAB] = 1.0
        model.gpt_neox.layers[0].attention.dense.weight[VOCAB + 1, 0] = 1.0
        model.get_output_embeddings().weight[writes, VOCAB + 1] = 10.0
    return model


def handbuilt_inputs(n_seq: int = 12) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sequence i's subject (SUBJECTS[i]) relates to T_O (USED-FOR, many-to-one: 12 token pairs over
    12 documents) and to a function word; T_X to T_C at position 12 (CONJUNCTION), a tail that, like
    T_O, stands only after the subject: the matched control of both kinds (same family and direction,
    same position class), unrelated to the subject."""
    rng = np.random.default_rng(0)
    seqs, trips = [], []
    for sid in range(n_seq):
        toks = [T_X, *rng.integers(5, 16, 19).tolist()]
        s, o, fw = 2 + sid % 6, 18 - sid % 6, 19
        toks[s], toks[o], toks[fw], toks[12] = SUBJECTS[sid % len(SUBJECTS)], T_O, T_FW, T_C
        mask = [k == fw for k in range(20)]
        seqs.append(dict(sequence_id=sid, document_id=sid, source="hand", unit="u", family="kg", text="",
                         token_ids=toks, function_mask=mask))
        for rel, head_pos, tail_pos in (("USED-FOR", s, o), ("FW", s, fw), ("CONJUNCTION", 0, 12)):
            trips.append(dict(sequence_id=sid, family="kg", relation=rel, category="c", direction="forward",
                              s=head_pos, o=tail_pos, head_id=toks[head_pos], tail_id=toks[tail_pos],
                              head_str="", tail_str=""))
    return pd.DataFrame(seqs), pd.DataFrame(trips)


@pytest.mark.parametrize("writes, expected", [(T_O, 1.0), (T_X, 0.0)])
def test_handbuilt_head(writes, expected):
    seqs, trips = handbuilt_inputs()
    rows = pd.DataFrame(score_relation_index(handbuilt(writes), seqs, trips))
    used = rows[rows.relation == "USED-FOR"]
    head0 = used[used["head"] == 0]
    # every j >= max(s, o) is an opportunity and head 0 passes both gates at each of them
    # (literal leaves out j = o, where the current token is the tail itself)
    expected_events = 2 * sum(20 - (18 - i) for i in range(6)) - np.where(head0["variant"] == "literal", 12, 0)
    assert (head0["events"] == expected_events).all()
    assert (head0["pass_rate"] == 1.0).all()
    np.testing.assert_allclose(head0["ri"], expected, atol=1e-6)
    assert (head0["clusters"] == 12).all()  # 12 documents and 12 token pairs
    assert (head0["sih"] == (expected == 1.0)).all()  # far above every control
    assert (head0["control_tenth"] < 0.5).all() and (head0["control_random"] < 0.5).all()
    # the zero heads tie everywhere: never qualify, RI undefined, no SIH
    others = used[used["head"] != 0]
    assert (others["events"] == 0).all() and others["ri"].isna().all() and not others["sih"].any()
    # a tail marked as function word is never a candidate, hence never an opportunity
    fw = rows[rows.relation == "FW"]
    assert (fw["opportunities"] == 0).all() and fw["ri"].isna().all()


def test_one_token_pair_is_not_evidence_of_a_relation():
    """The same perfect head, but every document holds the same pair (T_S, T_O): 12 documents, one
    token pair. A head that raises one token after another is not shown to encode a relation, so the
    cell is ``insufficient`` (clustering by document alone called it an SIH)."""
    seqs, trips = handbuilt_inputs()
    seqs["token_ids"] = [[T_S if t in SUBJECTS else t for t in ids] for ids in seqs["token_ids"]]
    trips["head_id"] = np.where(trips["head_id"].isin(SUBJECTS), T_S, trips["head_id"])
    rows = pd.DataFrame(score_relation_index(handbuilt(T_O), seqs, trips))
    head0 = rows[(rows.relation == "USED-FOR") & (rows["head"] == 0)]
    np.testing.assert_allclose(head0["ri"], 1.0, atol=1e-6)
    assert (head0["clusters"] == 1).all() and (head0["sih_status"] == "insufficient").all()


def test_tied_attention_never_qualifies():
    # a second subject token: head 0 splits its attention exactly between both, so neither is the argmax
    seqs, trips = handbuilt_inputs()
    seqs["token_ids"] = [[*ids[:10], SUBJECTS[(i + 1) % len(SUBJECTS)], *ids[11:]]
                         for i, ids in enumerate(seqs["token_ids"])]
    twin = trips[trips.relation == "USED-FOR"].assign(relation="TWIN", s=10)
    twin["head_id"] = [SUBJECTS[(i + 1) % len(SUBJECTS)] for i in twin["sequence_id"]]
    rows = pd.DataFrame(score_relation_index(handbuilt(T_O), seqs, pd.concat([trips, twin])))
    head0 = rows[(rows["head"] == 0) & rows.relation.isin(["USED-FOR", "TWIN"])]
    assert (head0["opportunities"] > 0).all() and (head0["events"] == 0).all()


def test_bad_inputs_are_named():
    seqs, trips = handbuilt_inputs(2)
    model = handbuilt(T_O)
    wrong = trips.copy()
    wrong.loc[0, "tail_id"] = 9
    with pytest.raises(ValueError, match="sequence 0: triplet USED-FOR"):
        score_relation_index(model, seqs, wrong)
    with pytest.raises(KeyError, match="not in the sequences table"):
        score_relation_index(model, seqs.iloc[:1], trips)
    with pytest.raises(KeyError, match="function_mask"):
        score_relation_index(model, seqs.drop(columns="function_mask"), trips)
    with pytest.raises(ValueError, match="gates"):
        score_relation_index(model, seqs, trips, gates=("top1",))


# ----------------------------------------------------------------------------- figures


def merged_table() -> pd.DataFrame:
    """A merged relation-index table of one model over three steps, 2 layers x 3 heads, in which
    head (1, 2) never qualifies and head (0, 0) has the best RI but too few documents at the end."""
    rng = np.random.default_rng(0)
    rows = []
    for step in (0, 10, 100):
        for family, relation in (("kg", "USED-FOR"), ("kg", "PART-OF"), ("syntax", "nsubj")):
            for layer in range(2):
                for head in range(3):
                    never = (layer, head) == (1, 2)
                    ri = math.nan if never else float(rng.random()) * (1 + step / 100)
                    events = 0 if never else (5 if (layer, head) == (0, 0) and step == 100 else 50)
                    if (layer, head) == (0, 0) and step == 100:
                        ri = 9.0
                    status = ("insufficient" if never or events < 20 else "sih" if ri > 0.5 else "not significant")
                    rows.append(dict(model="m/tiny", step=step, tokens=step * 10, layer=layer, head=head,
                                     family=family, relation=relation, direction="forward", gate="argmax",
                                     variant="source", ri=ri, ri_se=0.01, events=events, triplets=40,
                                     control_matched=0.08, control_tenth=0.1, control_random=0.05,
                                     effect=ri - 0.08, effect_se=0.01, effect_tenth=ri - 0.1, effect_tenth_se=0.01,
                                     effect_random=ri - 0.05, effect_random_se=0.01, sih_status=status,
                                     sih=status == "sih"))
    return pd.DataFrame(rows)


def test_final_heatmap_leaves_unqualified_heads_empty():
    from icl_dynamics.figures.relation_index import final_heatmaps, select_rows

    table = merged_table()
    rows = select_rows(table, model=None, gate="argmax", variant="source", direction="forward")
    fig = final_heatmaps(rows, "kg")
    axes = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title().split(" (")[0] for ax in axes] == ["PART-OF", "USED-FOR"]
    want = table[(table.step == 100) & (table.relation == "USED-FOR")]
    shown = axes[1].images[0].get_array()
    assert shown.mask[1, 2] and shown.mask.sum() == 1  # never qualified: masked, not 0
    for r in want.itertuples():
        if not math.isnan(r.ri):
            assert shown[r.layer, r.head] == pytest.approx(r.ri)
    dots = axes[1].collections[0].get_offsets()
    assert sorted(map(tuple, np.asarray(dots).tolist())) == sorted((r.head, r.layer) for r in want.itertuples() if r.sih)


def test_top_heads_over_training_follow_the_final_choice(tmp_path):
    from icl_dynamics.figures.relation_index import (
        select_rows,
        top_heads,
        top_heads_over_training,
        write_relation_index_figures,
    )

    table = merged_table()
    rows = select_rows(table, model="m/tiny", gate="argmax", variant="source", direction="forward")
    rel = rows[rows.relation == "nsubj"]
    last = rel[(rel.step == 100) & (rel.events >= 20)].sort_values("ri", ascending=False)
    chosen = top_heads(rel, 2)
    assert list(map(tuple, chosen.to_numpy())) == list(zip(last.layer[:2], last["head"][:2]))
    assert (0, 0) not in set(map(tuple, chosen.to_numpy()))  # best RI, too few events
    fig = top_heads_over_training(rows, "syntax", k=2)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    for layer, head in chosen.itertuples(index=False):
        series = rel[(rel.layer == layer) & (rel["head"] == head)].sort_values("step")
        np.testing.assert_allclose(lines[f"L{layer}H{head}"].get_ydata(), series.ri)
    np.testing.assert_allclose(lines["random ctrl"].get_ydata(), 0.05)
    written = write_relation_index_figures(table, tmp_path)
    assert sorted(p.name for p in written) == sorted(
        f"m--tiny_ri_{fam}_{kind}_argmax_source_forward.{ext}"
        for fam in ("kg", "syntax") for kind in ("final", "top") for ext in ("png", "pdf"))
    with pytest.raises(ValueError, match="variant='literal'"):
        select_rows(table, model=None, gate="argmax", variant="literal", direction="forward")


def test_dominance_ratio_quantiles_match_the_attention_by_hand(sharp_model):
    """ratio_p50 / ratio_p95 per head (and p95 over all heads) against the exact quantiles of
    top / runner-up attention over every query row with two visible keys, BOS prepended."""
    seqs, trips = random_inputs(seed=4, vocab=48, n_seq=5)
    rows = pd.DataFrame(score_relation_index(sharp_model, seqs, trips, gates=("argmax",), variants=("source",)))
    ratios: dict[tuple[int, int], list[float]] = {}
    for ids in seqs["token_ids"]:
        toks = torch.tensor([sharp_model.config.bos_token_id, *ids])
        for layer, attn in enumerate(hand_attention(sharp_model, toks)):
            for h in range(attn.shape[0]):
                for j in range(1, len(toks)):
                    top2 = attn[h, j, : j + 1].topk(2).values
                    ratios.setdefault((layer, h), []).append((top2[0] / top2[1]).item())
    step = 10 ** (4 / 400)  # one histogram bin
    for (layer, h), values in ratios.items():
        got = rows[(rows["layer"] == layer) & (rows["head"] == h)].iloc[0]
        for q, column in ((0.5, "ratio_p50"), (0.95, "ratio_p95")):
            exact = np.quantile(values, q, method="inverted_cdf")
            assert got[column] / step <= exact * (1 + 1e-9) and exact <= got[column] * (1 + 1e-9), (layer, h, q)
    pooled = np.quantile([v for vs in ratios.values() for v in vs], 0.95, method="inverted_cdf")
    assert rows["ratio_p95_model"].nunique() == 1
    assert rows["ratio_p95_model"].iloc[0] / step <= pooled <= rows["ratio_p95_model"].iloc[0] * (1 + 1e-9)
    assert rows["ratio_p95"].max() > 2.0 > rows["ratio_p50"].min()  # heads differ: the statistic is informative


# ----------------------------------------------------------------------------- contextual controls by position

CTX_VOCAB, CTX_HIDDEN = 24, 128
NOUNS, ADJECTIVES = tuple(range(10, 16)), tuple(range(16, 24))  # fillers 1-9; 0 is the BOS


def code(token: int) -> torch.Tensor:
    """A token's code in the residual stream: +1 at its id, -1 at id + 24 (zero mean, the same norm for all)."""
    out = torch.zeros(CTX_HIDDEN, dtype=torch.float64)
    out[token], out[CTX_VOCAB + token] = 1.0, -1.0
    return out


def previous_token_copier() -> torch.nn.Module:
    """Two layers, no relation anywhere: layer 0's head 0 attends to the previous position (rotary only: a
    constant query and key whose rotary phases all peak one position back) and writes that token's code into
    dimensions 48-95; layer 1's head 0 attends to the noun of largest flag (dimension 96) and copies what
    dimensions 48-95 hold there into the token-code dimensions, so it raises the token *before* the noun.
    Every other weight is zero (MLPs, the other heads, biases but the constant queries and keys)."""
    model = tiny_neox(vocab_size=CTX_VOCAB, hidden=CTX_HIDDEN, layers=2, heads=2).double()
    cfg = model.config
    d_head = CTX_HIDDEN // 2
    rotary = int(d_head * cfg.rope_parameters["partial_rotary_factor"])  # 16: 8 rotary frequency pairs
    theta = cfg.rope_parameters["rope_theta"]
    omega = 1.0 / theta ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in model.gpt_neox.layers:
            block.input_layernorm.weight.fill_(1.0)
            block.post_attention_layernorm.weight.fill_(1.0)
        model.gpt_neox.final_layer_norm.weight.fill_(1.0)
        embed = model.gpt_neox.embed_in.weight
        for t in range(CTX_VOCAB):
            embed[t] = code(t)
        for i, noun in enumerate(NOUNS):  # distinct flags: one noun wins the attention
            embed[noun, 96], embed[noun, 97] = 1.0 + 0.1 * i, -(1.0 + 0.1 * i)
        model.get_output_embeddings().weight[:, :] = embed
        # layer 0, head 0: q = (a, 0), k = R(omega)(a, 0) in each rotary pair (i, i + 8): scores peak at j - 1
        qkv0 = model.gpt_neox.layers[0].attention.query_key_value
        a = math.sqrt(30 * math.sqrt(d_head) / len(omega))
        qkv0.bias[: rotary // 2] = a
        qkv0.bias[d_head: d_head + rotary // 2] = a * torch.cos(omega)
        qkv0.bias[d_head + rotary // 2: d_head + rotary] = a * torch.sin(omega)
        ln_scale = math.sqrt(CTX_HIDDEN / 2)  # LayerNorm of a code: code / its std
        qkv0.weight[2 * d_head: 2 * d_head + 48, :48] = torch.eye(48, dtype=torch.float64) / ln_scale
        dense0 = model.gpt_neox.layers[0].attention.dense
        dense0.weight[48:96, :48] = torch.eye(48, dtype=torch.float64)
        # layer 1, head 0: a constant query against the flag, in a dimension rotary leaves alone
        qkv1 = model.gpt_neox.layers[1].attention.query_key_value
        qkv1.bias[rotary + 2] = 40.0
        qkv1.weight[d_head + rotary + 2, 96] = 1.0
        qkv1.weight[2 * d_head: 2 * d_head + 48, 48:96] = torch.eye(48, dtype=torch.float64)
        model.gpt_neox.layers[1].attention.dense.weight[:48, :48] = 10 * torch.eye(48, dtype=torch.float64)
    return model


def amod_like_inputs(n_seq: int = 150, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sequences of fillers with six (noun, adjective) pairs each, no noun or adjective twice: the adjective
    directly precedes its noun in about 60 % of them (as in forward amod), else stands 2-8 tokens before it
    or a few after. Forward triplets (noun at s -> adjective at o), one document per sequence."""
    rng = np.random.default_rng(seed)
    seqs, trips = [], []
    for sid in range(n_seq):
        n = 48
        toks = rng.integers(1, 10, n).tolist()
        nouns, adjectives = rng.permutation(NOUNS), rng.choice(ADJECTIVES, len(NOUNS), replace=False)
        taken = set()
        for k, (noun, adjective) in enumerate(zip(nouns, adjectives)):
            s = 6 + 7 * k
            where = rng.random()
            offsets = [-1] if where < 0.6 else list(rng.permutation(range(-8, -1))) if where < 0.85 else [1, 2, 3]
            o = next((s + d for d in offsets if s + d not in taken and 0 < s + d < n and (s + d) % 7 != 6), None)
            if o is None:
                continue
            taken |= {s, o}
            toks[s], toks[o] = int(noun), int(adjective)
            trips.append(dict(sequence_id=sid, family="syntax", relation="amod", category="modifier",
                              direction="forward", s=s, o=o, head_id=int(noun), tail_id=int(adjective),
                              head_str="", tail_str=""))
        seqs.append(dict(sequence_id=sid, document_id=sid, source="hand", unit="u", family="syntax", text="",
                         token_ids=toks, function_mask=[False] * n))
    return pd.DataFrame(seqs), pd.DataFrame(trips)


def test_contextual_controls_matched_on_position_cancel_a_previous_token_copier():
    """A previous-token head feeding a copying head raises whatever precedes the attended noun: no relation.
    On amod-like triplets, whose adjective often directly precedes its noun, the contextual effect over the
    matched control -- of the tail's position class -- is indistinguishable from 0, while the tail does
    beat the random control (which is seldom adjacent), and without position matching the matched control
    would too (tested once against that implementation, the same control by kind alone: effect 0.59 +- 0.06
    over 34 documents, flagged as an SIH)."""
    model = previous_token_copier()
    seqs, trips = amod_like_inputs()
    ids = torch.tensor([[0, *seqs["token_ids"][0]]])
    with torch.no_grad():  # the circuit as built: layer 0 attends one back, layer 1 to the flagged noun
        pattern = model(ids, output_attentions=True).attentions
    np.testing.assert_allclose(pattern[0][0, 0].argmax(-1)[1:].numpy(), np.arange(ids.shape[1] - 1))
    rows = pd.DataFrame(score_relation_index(model, seqs, trips, gates=("argmax",), variants=("contextual", "source"),
                                             min_clusters=10))
    ctx = rows[(rows["variant"] == "contextual") & (rows["layer"] == 1) & (rows["head"] == 0)].iloc[0]
    assert ctx["events"] > 2000 and ctx["ri"] > 0.3  # the head does raise tails: the adjacent ones
    assert ctx["clusters"] >= 10 and ctx["control_matched_events"] > 100  # a tested cell
    assert ctx["sih_status"] == "not significant" and abs(ctx["effect"]) <= 2 * ctx["effect_se"] + 0.02
    assert ctx["effect_random"] > 4 * ctx["effect_random_se"]  # the confound is there; only position matching removes it
    source = rows[(rows["variant"] == "source") & (rows["layer"] == 1) & (rows["head"] == 0)].iloc[0]
    assert source["events"] == 0  # raw embeddings carry nothing to copy: the head's OV reads the previous token only
