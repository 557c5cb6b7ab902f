import pytest

from icl_dynamics.checkpoints import (
    PYTHIA,
    PYTHIA_STEPS,
    Schedule,
    StepError,
    model_slug,
    parse_revision,
    revision,
    select_steps,
    unslug,
)


def test_pythia_grid_has_154_published_steps():
    assert len(PYTHIA_STEPS) == 154
    assert PYTHIA_STEPS[:12] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
    assert PYTHIA_STEPS[-2:] == (142_000, 143_000)
    assert all(b - a == 1000 for a, b in zip(PYTHIA_STEPS[11:], PYTHIA_STEPS[12:]))


def test_tokens_seen():
    assert PYTHIA.tokens(0) == 0
    assert PYTHIA.tokens(1000) == 1000 * 1024 * 2048
    assert PYTHIA.tokens(143_000) == 299_892_736_000


def test_missing_step_names_nearest_valid_steps():
    with pytest.raises(StepError, match=r"step 1500 .* nearest valid steps: 1000, 2000"):
        PYTHIA.tokens(1500)
    with pytest.raises(StepError, match=r"nearest valid steps: 512, 1000"):
        select_steps({"steps": [700]})
    with pytest.raises(StepError, match=r"nearest valid steps: 142000, 143000"):
        select_steps({"steps": [200_000]})


def test_log_preset():
    assert select_steps({"preset": "log"}) == [
        0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512,
        1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 143000,
    ]


def test_dense_early_preset():
    steps = select_steps({"preset": "dense-early"})
    assert steps[:11] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert [s for s in steps if 1000 <= s <= 20_000] == list(range(1000, 20_001, 1000))
    assert [s for s in steps if s > 20_000] == [*range(30_000, 140_001, 10_000), 143_000]


def test_all_preset_and_union_with_steps_and_ranges():
    assert select_steps({"preset": "all"}) == list(PYTHIA_STEPS)
    chosen = select_steps({"steps": [3000, 0], "ranges": [{"start": 100, "stop": 5000, "every": 2000}]})
    assert chosen == [0, 2000, 3000, 4000]
    assert select_steps({"ranges": [{"start": 3, "stop": 20}]}) == [4, 8, 16]


def test_bad_selections():
    with pytest.raises(StepError, match="empty"):
        select_steps({})
    with pytest.raises(StepError, match="unknown checkpoint preset 'weekly'"):
        select_steps({"preset": "weekly"})
    with pytest.raises(StepError, match="holds no pythia checkpoint"):
        select_steps({"ranges": [{"start": 513, "stop": 999}]})
    with pytest.raises(StepError, match="after stop"):
        select_steps({"ranges": [{"start": 10, "stop": 1}]})
    toy = Schedule("toy", (0, 100, 200), 2048)
    assert select_steps({"preset": "log"}, toy) == [0, 200]  # presets select from any schedule (issue 27)
    assert select_steps({"preset": "all"}, toy) == [0, 100, 200]


def test_revision_names_and_slugs():
    assert revision(1000) == "step1000"
    assert parse_revision("step143000") == 143_000
    with pytest.raises(StepError):
        parse_revision("main")
    assert model_slug("EleutherAI/pythia-70m") == "EleutherAI--pythia-70m"
    assert unslug("EleutherAI--pythia-70m", ["x/y", "EleutherAI/pythia-70m"]) == "EleutherAI/pythia-70m"
