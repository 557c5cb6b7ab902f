"""The plausibility guards' null tests; their planted signals are rows of tests/test_silent_wrong.py.

* The loss bound (:func:`icl_dynamics.models.check_loss`: finite and below log(vocab) + LOSS_MARGIN) on
  models no one corrupted: the Pythia-format fixture's three random initialisations (loaded through
  ``load_checkpoint``) and 6 more of the same construction at widths 64 to 256, on AGENDA text; and
  every toy-zoo checkpoint on its own text. None may be refused (measured: 0 of 26, the largest
  excess over log(vocab) 0.1 nats against a margin of 2); the test asserts most of the margin is left.
  Planted: flipped bytes served under their own hash (a bad mirror) give a mean loss of about 1,400
  nats and are refused.
* The probe comparison (:func:`icl_dynamics.validation.check_probe_outputs`): no two of the 17 toy-zoo
  checkpoints (136 pairs) give the same probe outputs within PROBE_TOLERANCE (measured: the closest
  pair differs by far more), while one checkpoint's outputs in float32 and float64 agree within it.
  Planted: another step's weights re-saved under a branch are refused at the merge.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHIA_MODEL, SHARED

from icl_dynamics.agenda import load_agenda, surface_text
from icl_dynamics.icl import per_token_losses
from icl_dynamics.models import LOSS_MARGIN, ImplausibleOutput, check_loss, load_checkpoint, load_tokenizer
from icl_dynamics.toyzoo import TOY_MODEL_ID, read_manifest
from icl_dynamics.validation import PROBE_TOLERANCE, ContentError, check_probe_outputs


def excess(model, docs: torch.Tensor) -> float:
    """Mean loss over log(vocab), through the guard (which raises when the bound is passed)."""
    with torch.no_grad():
        mean = check_loss("m", 0, model, per_token_losses(model, docs), "the text")
    return mean - math.log(model.config.vocab_size)


def test_the_loss_bound_refuses_no_initialised_or_trained_model(pythia_cache: Path, neox_tokenizer, toy_zoo: Path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from icl_dynamics.pythia_format import PythiaShape, pythia_config

    texts = [surface_text(r) for r in load_agenda(SHARED / "data" / "agenda")[:4]]
    docs = torch.tensor([neox_tokenizer(t)["input_ids"][:64] for t in texts])
    excesses = [excess(load_checkpoint(PYTHIA_MODEL, step, cache_dir=pythia_cache, device="cpu", tokenizer=False).model,
                       docs) for step in (0, 2, 1000)]
    for width in (64, 128, 256):
        config = pythia_config(SHARED, PythiaShape(hidden_size=width))
        for seed in range(2):
            torch.manual_seed(seed)
            model = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in config.items() if k != "torch_dtype"}))
            excesses.append(excess(model.eval(), docs))
    zoo = read_manifest(toy_zoo)
    tokenizer = load_tokenizer(TOY_MODEL_ID, 0, cache_dir=toy_zoo / "hub")
    lines = (toy_zoo / "text.jsonl").read_text().splitlines()[:4]
    toy_docs = torch.tensor([tokenizer(json.loads(line)["text"])["input_ids"][:64] for line in lines])
    for step in map(int, zoo["commits"]):
        excesses.append(excess(load_checkpoint(TOY_MODEL_ID, step, cache_dir=toy_zoo / "hub", device="cpu",
                                               tokenizer=False).model, toy_docs))
    assert len(excesses) == 9 + len(zoo["commits"])
    print(f"loss over log(vocab): largest {max(excesses):.3f} of {len(excesses)} models (margin {LOSS_MARGIN})")
    assert max(excesses) < LOSS_MARGIN / 4  # every model, with most of the margin to spare

    with pytest.raises(ImplausibleOutput, match=r"m@step0: mean loss nan nats"):
        check_loss("m", 0, model, np.full((2, 3), np.nan), "the text")


def test_the_probe_tells_every_toy_checkpoint_apart_and_one_checkpoint_not(toy_zoo: Path):
    steps = sorted(map(int, read_manifest(toy_zoo)["commits"]))
    loaded = {step: load_checkpoint(TOY_MODEL_ID, step, cache_dir=toy_zoo / "hub", device="cpu", tokenizer=False)
              for step in steps}
    gaps = [max(abs(x - y) for x, y in zip(loaded[a].probe, loaded[b].probe)) for a, b in combinations(steps, 2)]
    print(f"probe: closest of {len(gaps)} checkpoint pairs differs by {min(gaps):.3g} (tolerance {PROBE_TOLERANCE})")
    assert len(gaps) == 136 and min(gaps) > 100 * PROBE_TOLERANCE
    entries = [(Path(f"step{s}"), s, {**loaded[s].record(), "weights_digest": str(s)}) for s in steps]
    check_probe_outputs(entries)  # no false alarm

    again = load_checkpoint(TOY_MODEL_ID, 1000, cache_dir=toy_zoo / "hub", device="cpu", dtype="float64",
                            tokenizer=False)
    assert max(abs(x - y) for x, y in zip(again.probe, loaded[1000].probe)) < PROBE_TOLERANCE / 10
    with pytest.raises(ContentError, match="step 900 .* and step 1000 .* give the same outputs on the fixed probe"):
        check_probe_outputs([(Path("step900"), 900, {"probe": loaded[1000].probe, "weights_digest": "a"}),
                             (Path("step1000"), 1000, {"probe": again.probe, "weights_digest": "b"})])
