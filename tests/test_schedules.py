"""Schedules from the hub's branch names: parsed, checked, listed once from the (fake) hub, read offline."""

from __future__ import annotations

import json
import math

import pytest
from fakehub import FakeHub
from huggingface_hub import constants

from icl_dynamics import hub
from icl_dynamics.checkpoints import PYTHIA, PYTHIA_STEPS, StepError, select_steps
from icl_dynamics.schedules import (
    ScheduleError,
    cached_branch,
    parse_branch,
    read_record,
    record_schedule,
    schedule_from_branches,
)

OLMO2 = "allenai/OLMo-2-0425-1B"
OLMO2_RATE = 512 * 4096  # tokens per step of OLMo-2-0425-1B: its names give ceil(step x rate / 1e9) billions
MISSING = {7000, 23000, 24000, 61000}


def olmo2_branches() -> list[str]:
    """A realistic OLMo-2-0425-1B branch list: four early branches without ``stage1-`` at irregular steps, then
    ``stage1-`` every 1,000 steps with a few missing, a late irregular one, three stage-2 ingredients that
    restart the step count, and main. Tokens as the hub names them: whole billions, rounded up."""
    def tokens(step: int) -> int:
        return math.ceil(step * OLMO2_RATE / 1e9)

    names = [f"step{s}-tokens{tokens(s)}B" for s in (150, 600, 700, 850)]
    names += [f"stage1-step{s}-tokens{tokens(s)}B" for s in range(1000, 80_001, 1000) if s not in MISSING]
    names += [f"stage1-step{s}-tokens{tokens(s)}B" for s in (100_000, 1_000_000, 1_907_359)]
    names += [f"stage2-ingredient{k}-step{s}-tokens{math.ceil(s * OLMO2_RATE / 1e9)}B"
              for k in (1, 2, 3) for s in (1000, 11_000, 23_842)]
    return [*names, "main"]


def test_an_olmo2_branch_list_gives_stage_one_with_its_names_and_tokens():
    schedule = schedule_from_branches(OLMO2, olmo2_branches())
    expected = [150, 600, 700, 850, *(s for s in range(1000, 80_001, 1000) if s not in MISSING),
                100_000, 1_000_000, 1_907_359]
    assert list(schedule.steps) == expected
    assert schedule.revision(150) == "step150-tokens1B" and schedule.revision(1000) == "stage1-step1000-tokens3B"
    assert abs(schedule.tokens_per_step / OLMO2_RATE - 1) < 1 / 4000  # the last branch names 4000B, rounded up
    assert schedule.tokens(600) == pytest.approx(600 * OLMO2_RATE, rel=1 / 4000)  # not the name's 2B
    assert len(schedule.stage2) == 9
    # stage 2 is refused by name, a missing step names its neighbours
    with pytest.raises(StepError, match=r"only a stage-2 branch \(stage2-ingredient\d-step23842-tokens51B\)"):
        schedule.check(23_842)
    with pytest.raises(StepError, match="nearest valid steps: 6000, 8000"):
        schedule.check(7000)


def test_presets_select_from_any_schedule():
    schedule = schedule_from_branches(OLMO2, olmo2_branches())
    assert select_steps({"preset": "log"}, schedule) == [
        150, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 100_000, 1_000_000, 1_907_359]
    dense = select_steps({"preset": "dense-early"}, schedule)
    assert dense[:4] == [150, 600, 700, 850] and 20_000 in dense and 7000 not in dense
    assert [s for s in dense if s > 20_000] == [30_000, 40_000, 50_000, 60_000, 70_000, 80_000, 100_000,
                                               1_000_000, 1_907_359]  # 60000: nearest to 60000 (61000 missing)
    # Pythia's branch names give Pythia's schedule and presets
    pythia = schedule_from_branches("EleutherAI/pythia-70m", [f"step{s}" for s in PYTHIA_STEPS] + ["main"])
    assert pythia.steps == PYTHIA.steps and pythia.tokens_per_step == PYTHIA.tokens_per_step
    assert pythia.revision(1000) == "step1000"
    assert select_steps({"preset": "log"}, pythia) == select_steps({"preset": "log"})


@pytest.mark.parametrize("names, message", [
    (["stage1-step1000-tokens3B", "checkpoint-1000"], r"branch 'checkpoint-1000' is not a checkpoint name we know"),
    (["stage1-step1000-tokens3B", "step1000-tokens3B"], r"step 1000 is named twice, by branches"),
    (["stage1-step1000-tokens3B", "stage1-step2000-tokens9B", "stage1-step100000-tokens210B"],
     r"branch 'stage1-step2000-tokens9B' names 9B tokens, but at the 2,100,000 tokens per step"),
    (["step1000", "stage1-step2000-tokens5B"], r"branch '(step1000|stage1-step2000-tokens5B)' is named unlike"),
    (["main", "stage2-ingredient1-step1000-tokens3B"], "no stage-1 checkpoint branch"),
])
def test_unknown_or_irregular_names_are_an_error_naming_the_branch(names, message):
    with pytest.raises(ScheduleError, match=message):
        schedule_from_branches(OLMO2, names)


def test_branch_names_parse_to_their_step_and_segment():
    assert parse_branch("main") is None
    assert parse_branch("step150-tokens1B").step == 150
    assert parse_branch("stage2-ingredient3-step23842-tokens50B").segment == "stage2-ingredient3"
    assert parse_branch("step143000").tokens_named_b is None


def test_the_branches_are_listed_once_from_the_hub_and_read_offline(tmp_path, monkeypatch):
    """Against the fake hub on 127.0.0.1: the record holds every branch with its commit and its provenance;
    once written, the hub is never asked again (it is shut down), and offline with no record is an error."""
    cache = tmp_path / "hub"
    names = olmo2_branches()
    commit = hub.write_snapshot(cache, OLMO2, names, {"config.json": b'{"model_type": "olmo2"}\n'})
    record_path = tmp_path / "results" / "allenai--OLMo-2-0425-1B" / "branches.json"
    with FakeHub(cache) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        listed = record_schedule(OLMO2, record_path, offline=False)
    record = read_record(record_path)
    assert record["model"] == OLMO2 and record["endpoint"] == server.endpoint
    assert set(record["branches"]) == set(names) and set(record["branches"].values()) == {commit}
    assert record["listed_at"] and record["huggingface_hub"]
    offline = record_schedule(OLMO2, record_path, offline=True)  # the hub is gone: read from the record
    assert offline == listed == schedule_from_branches(OLMO2, names)
    with pytest.raises(ScheduleError, match=r"no branch record at .* icl-dynamics branches --model"):
        record_schedule(OLMO2, tmp_path / "absent.json", offline=True)
    with pytest.raises(ScheduleError, match="records the branches of allenai/OLMo-2-0425-1B, not allenai/OLMo-1B-hf"):
        record_schedule("allenai/OLMo-1B-hf", record_path, offline=True)
    record_path.write_text(json.dumps({"branches": []}))
    with pytest.raises(ScheduleError, match="is not a branch record"):
        record_schedule(OLMO2, record_path, offline=True)


def test_a_cached_checkpoint_is_found_by_its_step_whatever_its_branch_is_called(tmp_path):
    cache = tmp_path / "hub"
    hub.write_snapshot(cache, OLMO2, ["step150-tokens1B", "stage1-step1000-tokens3B",
                                      "stage2-ingredient1-step150-tokens1B"], {"config.json": b"{}"})
    assert cached_branch(OLMO2, 150, cache) == "step150-tokens1B"  # never the stage-2 branch of that count
    assert cached_branch(OLMO2, 1000, cache) == "stage1-step1000-tokens3B"
    assert cached_branch(OLMO2, 2000, cache) == "step2000"  # absent: the default name, whose load then fails
