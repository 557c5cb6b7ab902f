"""ICL levels 2 and 3: format compliance and pattern discovery on the paper's synthetic tasks.

Each task pairs two words and labels the pair by the categories of its words with arbitrary
digits, so prior knowledge cannot solve it (Ren et al. 2024; method notes section 4.2). A prompt
holds one demonstration per line and ends with the query pair::

     apple, June: 0
     March, pear: 1
     fig, May:

Prompt format, chosen against the GPT-NeoX tokenizer (tests check it with the real file):

* Every line starts with a space, so each word appears as `` word`` (with its leading space)
  in every position. GPT-NeoX splits ``"\\n word"`` into ``["\\n", " word"]``, but ``"\\nword"``
  into ``["\\n", "word"]``, and only 4 common fruits are single tokens without the space, against
  14 with it. The word lists in ``data/icl_words.json`` are single tokens in the `` word`` form.
* The query line ends with ``":"``, not ``": "``. GPT-NeoX tokenizes ``": 0"`` as
  ``[":", " 0"]``, so in the demonstrations the label is the token `` 0``, and the legal labels
  are `` 0`` .. `` 8`` (each a single token). A query ending in ``": "`` would end on a lone
  space token that never occurs before a label in the demonstrations (the BPE token-boundary
  problem), and would ask for ``"0"``, a token the demonstrations never show. The replicators
  ended with ``": "``; this is a deliberate deviation.
* The text is tokenized without special tokens: Pythia adds no BOS.
* A tokenizer that never merges a digit with the space before it (OLMo-2's cl100k-style BPE: ``": 0"`` is
  ``[":", " ", "0"]``) gets the query ending ``": "`` instead, so that it ends on the space token every
  demonstration's label follows and the legal labels are ``0`` .. ``8`` (:func:`label_separator`).

Query words are held out of their prompt's demonstrations. Otherwise a model could copy the label
of an earlier demonstration that shares a query word in the same slot: with the words shared, that
lookup scored 0.89 on the binary fruit/month task at 20 shots, induction-style copying passing for
pattern discovery. Two baselines are computed on the same prompts and stored beside the model's
accuracy: ``baseline_lookup`` (that copying rule) and ``baseline_majority`` (the most frequent
demonstrated label); both sit at chance on these prompts (tested). The word lists hold every
single-token (`` word``) member of each category we found in the GPT-NeoX vocabulary for fruit (14)
and month (12); furniture, profession and animal were extended with further single-token words
(19, 30, 30), so that 20 distinct demonstration pairs always remain without the query's words.

Prompts are batched with right padding: under causal attention a real token never sees the
pads that follow it, and positions count from 0 exactly as for the unpadded prompt, so each
prompt's next-token logits are read at its own last real token: the base model's final hidden
state there goes through the unembedding, so the full ``[batch, time, vocab]`` logits are never
built. (A per-row 2-D ``logits_to_keep`` tensor would do the same on the newest transformers, but
crashes on 5.17, which current CUDA images ship.)
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icl_dynamics.models import check_context

SHOTS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 10, 20)
WORDS_RESOURCE = "data/icl_words.json"

@dataclass(frozen=True)
class Task:
    """A synthetic classification task: label ``class_pairs.index((i, j))`` for a pair of words
    from ``categories[i]`` and ``categories[j]``."""

    name: str
    categories: tuple[str, ...]
    class_pairs: tuple[tuple[int, int], ...]

    @property
    def n_classes(self) -> int:
        return len(self.class_pairs)

    @property
    def chance(self) -> float:
        return 1.0 / self.n_classes

    def label(self, i: int, j: int) -> int:
        """The label of a pair whose words come from categories ``i`` and ``j``."""
        try:
            return self.class_pairs.index((i, j))
        except ValueError:
            raise ValueError(f"task {self.name!r} has no class for category pair ({i}, {j})") from None


def _grid(k: int) -> tuple[tuple[int, int], ...]:
    """All category pairs (i, j) in the order of the label k*i + j."""
    return tuple((i, j) for i in range(k) for j in range(k))


TASKS: tuple[Task, ...] = (
    Task("binary_fruit_month", ("fruit", "month"), ((0, 1), (1, 0))),
    Task("binary_furniture_profession", ("furniture", "profession"), ((0, 1), (1, 0))),
    Task("four_class_fruit_month", ("fruit", "month"), _grid(2)),
    Task("nine_class_fruit_animal_month", ("fruit", "animal", "month"), _grid(3)),
)


@dataclass(frozen=True)
class Prompt:
    """One few-shot prompt: its text (ending before the label), the query pair and its label,
    and the demonstrations as (word1, word2, label)."""

    text: str
    label: int
    query: tuple[str, str]
    demonstrations: tuple[tuple[str, str, int], ...]


def load_words() -> dict[str, list[str]]:
    """The packaged word lists, by category (a fresh copy); checks that no word is in two categories."""
    return {category: list(items) for category, items in _packaged_words().items()}


@cache
def _packaged_words() -> dict[str, list[str]]:
    raw = resources.files("icl_dynamics").joinpath(WORDS_RESOURCE).read_text(encoding="utf-8")
    words = json.loads(raw)
    seen: dict[str, str] = {}
    for category, items in words.items():
        if not isinstance(items, list) or not all(isinstance(w, str) and w and w.strip() == w for w in items):
            raise ValueError(f"{WORDS_RESOURCE}: category {category!r} must be a list of non-empty, unpadded words")
        for w in items:
            if w in seen:
                raise ValueError(f"{WORDS_RESOURCE}: word {w!r} is in both {seen[w]!r} and {category!r}")
            seen[w] = category
    return words


def format_line(word1: str, word2: str, label: int | None = None) -> str:
    """One prompt line: `` word1, word2: label`` with a newline, or the query ending at ``":"``."""
    return f" {word1}, {word2}:" if label is None else f" {word1}, {word2}: {label}\n"


def make_prompts(task: Task, shots: int, n_prompts: int = 50, seed: int = 0) -> list[Prompt]:
    """``n_prompts`` seeded prompts for ``task`` with ``shots`` demonstrations each.

    Pure and deterministic in (task, shots, n_prompts, seed), so every checkpoint sees the same
    prompts. Query labels are balanced (class counts differ by at most one); with
    ``shots >= n_classes`` every class is demonstrated, with fewer shots the demonstrated classes
    are distinct. A pair's two words always differ; demonstrations are distinct pairs, and neither
    of the query's words occurs in them (see the module docstring).
    """
    if shots < 0 or n_prompts < 1:
        raise ValueError(f"need shots >= 0 and n_prompts >= 1, got shots={shots}, n_prompts={n_prompts}")
    words = load_words()
    missing = [c for c in task.categories if c not in words]
    if missing:
        raise ValueError(f"task {task.name!r}: categories {missing} not in {WORDS_RESOURCE}")
    pools = [words[c] for c in task.categories]
    rng = random.Random(f"{task.name}/{shots}/{n_prompts}/{seed}")
    k = task.n_classes

    def draw(label: int, taken: set[frozenset[str]], words: list[list[str]]) -> tuple[str, str]:
        i, j = task.class_pairs[label]
        for _ in range(10_000 if words[i] and words[j] else 0):
            a, b = rng.choice(words[i]), rng.choice(words[j])
            if a != b and frozenset((a, b)) not in taken:
                return a, b
        raise ValueError(f"task {task.name!r}: too few words to draw {shots} distinct demonstrations "
                         "without the query's words")

    labels = list(range(k)) * (n_prompts // k) + rng.sample(range(k), n_prompts % k)
    rng.shuffle(labels)
    prompts = []
    for label in labels:
        query = draw(label, set(), pools)
        if shots >= k:
            demo_labels = list(range(k)) + [rng.randrange(k) for _ in range(shots - k)]
            rng.shuffle(demo_labels)
        else:
            demo_labels = rng.sample(range(k), shots)
        taken: set[frozenset[str]] = set()
        held_out = [[w for w in pool if w not in query] for pool in pools]  # the query's words never recur
        demos = []
        for demo_label in demo_labels:
            a, b = draw(demo_label, taken, held_out)
            taken.add(frozenset((a, b)))
            demos.append((a, b, demo_label))
        text = "".join(format_line(a, b, y) for a, b, y in demos) + format_line(*query)
        prompts.append(Prompt(text, label, query, tuple(demos)))
    return prompts


def majority_prediction(prompt: Prompt) -> int:
    """The most frequent demonstrated label (ties: the one demonstrated last); 0 without demonstrations."""
    labels = [y for _, _, y in prompt.demonstrations]
    if not labels:
        return 0
    last = {y: i for i, y in enumerate(labels)}
    return max(last, key=lambda y: (labels.count(y), last[y]))


def lookup_prediction(prompt: Prompt) -> int:
    """The label of the latest demonstration sharing a query word in the same slot, else
    :func:`majority_prediction`: what copying alone achieves, without finding the pattern."""
    for a, b, y in reversed(prompt.demonstrations):
        if a == prompt.query[0] or b == prompt.query[1]:
            return y
    return majority_prediction(prompt)


LOOKUP_BASELINE = "baseline_lookup"
BASELINES = {LOOKUP_BASELINE: lookup_prediction, "baseline_majority": majority_prediction}


def label_separator(tokenizer: PreTrainedTokenizerBase, context: str) -> str:
    """What the query text gets after its ``":"`` so that the next token is a label: ``""`` when the tokenizer
    makes ``" 0"`` one token (GPT-NeoX, OLMo-1), ``" "`` when it splits it into a space token and the digit
    (OLMo-2's cl100k-style BPE keeps digits apart): every demonstration's label then follows that space
    token, so the query ends on it (the same token-boundary reasoning as the module docstring's)."""
    base = tokenizer.encode(context, add_special_tokens=False)
    full = tokenizer.encode(context + " 0", add_special_tokens=False)
    if full[: len(base)] == base and len(full) == len(base) + 1:
        return ""
    spaced = tokenizer.encode(context + " ", add_special_tokens=False)
    if spaced[: len(base)] == base and len(spaced) == len(base) + 1 and full[: len(spaced)] == spaced \
            and len(full) == len(spaced) + 1:
        return " "
    raise ValueError(f"tokenizer splits the label 0 after ':' into {full[len(base):]} (or merges it with ':'); "
                     "labels must be single tokens")


def label_token_ids(tokenizer: PreTrainedTokenizerBase, n_classes: int, context: str) -> list[int]:
    """Token ids of the labels 0..n_classes-1 as they follow ``context`` (a prompt ending in ``":"``) and its
    :func:`label_separator`.

    Raises if a label is not one token, or if appending it changes the context's own tokens.
    """
    separator = label_separator(tokenizer, context)
    context += separator
    base = tokenizer.encode(context, add_special_tokens=False)
    ids = []
    for label in range(n_classes):
        full = tokenizer.encode(context + ("" if separator else " ") + str(label), add_special_tokens=False)
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(
                f"tokenizer splits the label {label} after ':' into {full[len(base):]} (or merges it with ':'); "
                "labels must be single tokens"
            )
        ids.append(full[-1])
    return ids


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% for z = 1.96).

    Kept as the closed form rather than ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``
    because it takes ``z`` directly and builds no test object per cell; the tests check it against
    SciPy's to 1e-12.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"Wilson interval needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any valid id works for right padding (pads come after every real token); prefer the pad token."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@torch.inference_mode()
def next_token_logits(
    model: PreTrainedModel, sequences: Sequence[Sequence[int]], *, pad_id: int = 0, batch_size: int = 16
) -> torch.Tensor:
    """Float32 next-token logits ``[len(sequences), vocab]`` after each sequence's last token.

    Batches right-padded, longest first to keep padding small; each row's logits are taken at its
    own last real token. Runs on the model's device; the result is on the CPU.
    """
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot score an empty token sequence")
    check_context(model, max(len(s) for s in sequences), "the longest ICL prompt (icl_tasks.shots)")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for start in tqdm(range(0, len(order), batch_size), desc="ICL prompts", mininterval=5):
        rows = order[start : start + batch_size]
        width = len(sequences[rows[0]])
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(sequences[i])] = torch.as_tensor(sequences[i])
            mask[r, : len(sequences[i])] = 1
        last = (mask.sum(1) - 1).to(device)  # position of each row's last real token
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        logits = model.get_output_embeddings()(hidden[torch.arange(len(rows), device=device), last])
        for r, i in enumerate(rows):
            out[i] = logits[r].float().cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    tasks: Sequence[Task] = TASKS,
    shots: Sequence[int] = SHOTS,
    n_prompts: int = 50,
    seed: int = 0,
    batch_size: int = 16,
) -> list[dict]:
    """Format compliance and pattern-discovery accuracy per (task, shots), as ICL_SCHEMA rows
    without ``model``, ``step`` and ``tokens`` (the caller adds them).

    Per (task, shots), five rows over the same ``n_prompts`` prompts, each with a Wilson 95% CI:
    ``format_compliance`` (top-1 token over the whole vocabulary is a legal label; chance null),
    and under level ``pattern_discovery`` ``accuracy_constrained`` (argmax over the legal label
    tokens only: the level's measure), ``accuracy`` (the unconstrained top-1 token is the correct
    label: it can never exceed format compliance) and the model-free :data:`BASELINES`, all with
    chance 1/classes.
    """
    jobs = [(task, s, make_prompts(task, s, n_prompts, seed)) for task in tasks for s in shots]
    sequences = [tokenizer.encode(p.text + label_separator(tokenizer, p.text), add_special_tokens=False)
                 for _, _, prompts in jobs for p in prompts]
    logits = next_token_logits(model, sequences, pad_id=_pad_id(tokenizer), batch_size=batch_size)
    rows: list[dict] = []
    offset = 0
    for task, s, prompts in jobs:
        legal = torch.tensor(label_token_ids(tokenizer, task.n_classes, prompts[0].text))
        block = logits[offset : offset + len(prompts)]
        offset += len(prompts)
        gold = torch.tensor([p.label for p in prompts])
        top1 = block.argmax(dim=1)
        counts = {
            ("format_compliance", "format_compliance", None): int(torch.isin(top1, legal).sum()),
            ("pattern_discovery", "accuracy_constrained", task.chance): int(
                (block[:, legal].argmax(dim=1) == gold).sum()
            ),
            ("pattern_discovery", "accuracy", task.chance): int((top1 == legal[gold]).sum()),
            **{("pattern_discovery", name, task.chance): sum(predict(p) == p.label for p in prompts)
               for name, predict in BASELINES.items()},
        }
        for (level, metric, chance), k in counts.items():
            low, high = wilson_interval(k, len(prompts))
            rows.append(
                dict(level=level, task=task.name, shots=s, metric=metric, value=k / len(prompts),
                     ci_low=low, ci_high=high, n=len(prompts), chance=chance)
            )
    return rows
