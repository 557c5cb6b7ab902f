"""The toy model zoo: a tiny GPT-NeoX trained on the CPU until induction heads form.

The zoo is the pipeline's offline fixture and demo. A 2-layer, 64-wide GPT-NeoX (rotary on 25% of
head dimensions like Pythia, but rotary base 100: with base 10,000 no phase change came within
3,700 steps) learns on random-token sequences in which segments are copied at random lengths and
offsets (fixed-position copies would teach a positional shortcut instead of induction). Copied
tokens can only be predicted by induction, so the copied-token loss drops sharply when the heads
form. Checkpoints before, during and after that change are written into a directory laid out
exactly as the Hugging Face hub cache, so ``from_pretrained("icl-dynamics/toy-neox",
revision="step<N>")`` with ``HF_HUB_OFFLINE=1`` loads them through the code path a Pythia checkpoint
takes. Each snapshot carries its own word-level ``tokenizer.json`` whose vocabulary also holds the
words of the ICL tasks. Training runs on one CPU thread so the same seed gives the same weights.

The *relations* zoo (``icl-dynamics toy-zoo --kind toy-relations``, model id
``icl-dynamics/toy-neox-relations``) is the positive control for the relation index: the same
architecture trained on sequences with planted relations instead of copies (:mod:`icl_dynamics.planted`),
in which heads that attend from a relation's marker to its head token and raise the tail form
during training. It also carries ``planted.json`` (the map) and ``relations.jsonl`` (held-out
sequences without BOS, for the relations stage).

torch, transformers and tokenizers are imported inside the functions that train and write: the
zoo's definitions (kinds, seed, schedule, manifest) stay light for the CLI's quick commands and the
Snakefile.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from icl_dynamics import hub, planted
from icl_dynamics import io as tables
from icl_dynamics.checkpoints import Schedule, revision

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

log = logging.getLogger(__name__)

TOY_MODEL_ID = "icl-dynamics/toy-neox"
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>", "[UNK]")
PUNCTUATION = ("\n", ",", ":", ".", ";", "(", ")", "-")
# Seed 1's heads form between steps 900 and 1100 (seed 0 had not formed them by step 2,400).
TOY_SEED = 1
TOY_STEPS = (0, 100, 200, 400, 600, 800, 850, 900, 925, 950, 975, 1000, 1050, 1100, 1200, 1400, 1600)
TOY, TOY_RELATIONS = "toy", "toy-relations"  # the zoos, named as their checkpoint schedules
ZOO_KINDS = (TOY, TOY_RELATIONS)
RELATIONS_MODEL_ID = "icl-dynamics/toy-neox-relations"

TRAINING_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("copied_loss", pa.float64()),  # null without copies (the relations zoo)
        pa.field("relation_loss", pa.float64()),  # tails after a planted marker; null in the copy zoo
        pa.field("decoy_loss", pa.float64()),  # filler after a decoy marker (never predictable)
    ]
)


@dataclass(frozen=True)
class ToyConfig:
    """Everything that determines the zoo's weights (the defaults are the shipped zoo)."""

    seed: int = TOY_SEED
    steps: tuple[int, ...] = TOY_STEPS
    batch_size: int = 32
    seq_len: int = 64
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    rotary_pct: float = 0.25
    rotary_base: float = 100.0
    lr: float = 1e-3
    copies_per_sequence: int = 2
    min_copy: int = 4
    max_copy: int = 20
    text_docs: int = 400
    log_every: int = 50
    model_id: str = TOY_MODEL_ID
    # planted relations (the relations zoo); see icl_dynamics.planted
    planted: bool = False
    relations_per_sequence: int = 2
    events_per_relation: int = 2
    mention_end: int = 20

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def kind(self) -> str:
        return TOY_RELATIONS if self.planted else TOY

    def schedule(self) -> Schedule:
        return Schedule(self.kind, tuple(self.steps), self.tokens_per_step)

    def relations(self) -> list[planted.PlantedRelation]:
        """The planted relations (none in the copy zoo); their map is drawn from the seed."""
        return planted.make_relations(self.seed) if self.planted else []

    def untrained(self) -> list[planted.PlantedRelation]:
        """The copy zoo's relations over its own words, which it was never trained on (the relation
        index's null control on it: :func:`icl_dynamics.planted.untrained_relations`); none for the relations zoo."""
        if self.planted:
            return []
        words = json.loads(resources.files("icl_dynamics").joinpath("data/icl_words.json").read_text())
        return planted.untrained_relations(words, self.seed)


def zoo_config(kind: str, seed: int | None = None) -> ToyConfig:
    """The shipped configuration of zoo ``kind`` (``toy`` or ``toy-relations``), with another seed if given.

    Another seed is another training run, so its model id says so (``icl-dynamics/toy-neox-seed2``): the
    runs of a seed group (README, "Seed groups") can then share one hub cache."""
    if kind not in ZOOS:
        raise ValueError(f"unknown toy zoo {kind!r}; choose from {sorted(ZOOS)}")
    cfg = ZOOS[kind]
    if seed is None or seed == cfg.seed:
        return cfg
    return replace(cfg, seed=seed, model_id=f"{cfg.model_id}-seed{seed}")


def toy_vocabulary(cfg: ToyConfig | None = None) -> list[str]:
    """Special tokens, punctuation, digits, capital letters (relation anchors), the ICL task words,
    and for the relations zoo the planted relations' words."""
    words = json.loads(resources.files("icl_dynamics").joinpath("data/icl_words.json").read_text())
    task_words = [w for category in words.values() for w in category]
    digits = [str(d) for d in range(10)]
    letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab = [*SPECIAL_TOKENS, *PUNCTUATION, *digits, *letters, *task_words]
    if cfg is not None:
        vocab += planted.relation_words(cfg.relations())
    duplicates = {w for w in vocab if vocab.count(w) > 1}
    if duplicates:
        raise ValueError(f"toy vocabulary lists words twice: {sorted(duplicates)}")
    return vocab


def build_tokenizer(vocab: Sequence[str]) -> Tokenizer:
    """A word-level tokenizer: spaces separate, newlines and punctuation are tokens of their own."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n|[^\w\s]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def tokenizer_files(tok: Tokenizer, seq_len: int) -> dict[str, bytes]:
    """The tokenizer files a hub repository carries, for this tokenizer."""
    special = {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[1],
               "unk_token": SPECIAL_TOKENS[2]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **special}
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True).encode(),
    }


def model_config(cfg: ToyConfig, vocab_size: int) -> GPTNeoXConfig:
    """The toy GPT-NeoX architecture (Pythia's, scaled down)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=4 * cfg.hidden_size,
        max_position_embeddings=cfg.seq_len,
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_base,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def copy_batch(gen: torch.Generator, cfg: ToyConfig, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens after a BOS, with segments copied to later random offsets.

    Returns the token ids [batch, seq_len] and a mask of the positions whose token is predictable
    only by induction (inside a copy, after its first token).
    """
    import torch

    n_special = len(SPECIAL_TOKENS)
    x = torch.randint(n_special, vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)
    x[:, 0] = 0
    copied = torch.zeros_like(x, dtype=torch.bool)
    for i in range(cfg.batch_size):
        for _ in range(cfg.copies_per_sequence):
            length = int(torch.randint(cfg.min_copy, cfg.max_copy + 1, (1,), generator=gen))
            src = int(torch.randint(1, cfg.seq_len - 2 * length, (1,), generator=gen))
            dst = int(torch.randint(src + length, cfg.seq_len - length + 1, (1,), generator=gen))
            x[i, dst:dst + length] = x[i, src:src + length]
            copied[i, dst + 1:dst + length] = True
    return x, copied


def training_batch(gen: torch.Generator, cfg: ToyConfig, vocab: Sequence[str],
                   relations: Sequence[planted.PlantedRelation]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch of the zoo's training data and the masks of the positions each curve column follows:
    copies (copy zoo) or planted relations (relations zoo, which has no copies)."""
    import torch

    if not cfg.planted:
        x, copied = copy_batch(gen, cfg, len(vocab))
        return x, {"copied_loss": copied}
    index = {w: i for i, w in enumerate(vocab)}
    special = set(SPECIAL_TOKENS) | set(planted.relation_words(relations))
    filler = torch.tensor([i for i, w in enumerate(vocab) if w not in special])
    x, rewarded, decoy = planted.relation_batch(
        gen, relations, index, filler, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
        relations_per_sequence=cfg.relations_per_sequence, events_per_relation=cfg.events_per_relation,
        mention_end=cfg.mention_end)
    return x, {"relation_loss": rewarded, "decoy_loss": decoy}


@dataclass
class TrainedZoo:
    """Checkpoints (state dicts by step) and the training curve."""

    config: ToyConfig
    vocab: list[str]
    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train(cfg: ToyConfig, *, progress: bool = True) -> TrainedZoo:
    """Train the toy model, keeping a copy of the weights at each of ``cfg.steps``."""
    import torch
    from tqdm import tqdm
    from transformers import GPTNeoXForCausalLM

    vocab = toy_vocabulary(cfg)
    relations = cfg.relations()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible weights whatever the machine's core count
    try:
        torch.manual_seed(cfg.seed)
        model = GPTNeoXForCausalLM(model_config(cfg, len(vocab)))
        model.config._attn_implementation = "sdpa"
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        zoo = TrainedZoo(cfg, vocab)
        start = time.perf_counter()
        last = max(cfg.steps)
        for step in tqdm(range(last + 1), desc="toy zoo", disable=not progress, mininterval=2):
            if step in cfg.steps:
                zoo.states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if step == last:
                break
            x, masks = training_batch(gen, cfg, vocab, relations)
            logits = model(x).logits[:, :-1]
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, len(vocab)), x[:, 1:].reshape(-1), reduction="none"
            ).view(x.shape[0], -1)
            loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % cfg.log_every == 0:
                zoo.curve.append({"step": step, "loss": loss.item(),
                                  **{name: losses[mask[:, 1:]].mean().item() for name, mask in masks.items()}})
        zoo.seconds = time.perf_counter() - start
        return zoo
    finally:
        torch.set_num_threads(threads)


def held_out_text(cfg: ToyConfig, vocab: Sequence[str], n_docs: int, *, offset: int = 10_000,
                  bos: bool = True) -> list[str]:
    """Documents from the training distribution (seed + ``offset``), as text.

    Each is a whole training-length sequence, its leading BOS written as the special token's text
    (which the tokenizer maps back to the BOS id), so it tokenises to exactly ``seq_len`` ids; with
    ``bos=False`` the BOS is left out (the relations stage's texts: the relation index adds it).
    """
    import torch

    gen = torch.Generator().manual_seed(cfg.seed + offset)
    relations = cfg.relations()
    docs: list[str] = []
    while len(docs) < n_docs:
        x, _ = training_batch(gen, cfg, vocab, relations)
        docs.extend(" ".join(vocab[i] for i in row.tolist()[0 if bos else 1:]) for row in x)
    return docs[:n_docs]


def write_untrained(cfg: ToyConfig, vocab: Sequence[str], out_dir: str | Path) -> list[Path]:
    """The copy zoo's ``planted.json`` (relations it was never trained on, :meth:`ToyConfig.untrained`)
    and ``relations.jsonl`` (``cfg.text_docs`` sequences holding them as the relations zoo's training
    data hold its planted relations: two tails mentioned early, each head later as ``head marker tail``;
    no BOS) in ``out_dir``."""
    import torch

    decoys = cfg.untrained()
    index = {w: i for i, w in enumerate(vocab)}
    special = set(SPECIAL_TOKENS) | set(planted.relation_words(decoys))
    filler = torch.tensor([i for i, w in enumerate(vocab) if w not in special])
    gen = torch.Generator().manual_seed(cfg.seed + 30_000)
    docs: list[str] = []
    while len(docs) < cfg.text_docs:
        x, _, _ = planted.relation_batch(gen, decoys, index, filler, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                         relations_per_sequence=len(decoys), events_per_relation=cfg.events_per_relation,
                                         mention_end=cfg.mention_end)
        docs.extend(" ".join(vocab[i] for i in row.tolist()[1:]) for row in x)
    out = Path(out_dir)
    paths = [planted.write_map(decoys, out / "planted.json"), out / "relations.jsonl"]
    _write_jsonl(paths[1], docs[:cfg.text_docs])
    return paths


def _weights_files(model: GPTNeoXForCausalLM, with_safetensors: bool) -> tuple[dict[str, bytes], list[str]]:
    """config.json plus pytorch_model.bin (always, like Pythia's branches) and, optionally, safetensors."""
    import torch

    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files["config.json"] = (Path(tmp) / "config.json").read_bytes()
        if with_safetensors:
            files["model.safetensors"] = (Path(tmp) / "model.safetensors").read_bytes()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    files["pytorch_model.bin"] = buf.getvalue()
    return files, [n for n in files if n != "config.json"]


def write_zoo(zoo: TrainedZoo, out_dir: str | Path) -> Path:
    """Write the zoo: ``hub/`` (a hub-layout cache), ``text.jsonl``, ``training.parquet``, ``zoo.json``.

    Every other checkpoint also carries ``model.safetensors`` so both weight formats are exercised;
    the directory is built under a temporary name and renamed into place.
    """
    from transformers import GPTNeoXForCausalLM

    cfg = zoo.config
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tok_files = tokenizer_files(build_tokenizer(zoo.vocab), cfg.seq_len)
        model = GPTNeoXForCausalLM(model_config(cfg, len(zoo.vocab)))
        commits = {}
        for i, step in enumerate(sorted(zoo.states)):
            model.load_state_dict(zoo.states[step])
            files, lfs = _weights_files(model, with_safetensors=i % 2 == 1)
            refs = [revision(step)] + (["main"] if step == max(zoo.states) else [])
            commits[step] = hub.write_snapshot(tmp / "hub", cfg.model_id, refs, {**files, **tok_files}, lfs)
        _write_jsonl(tmp / "text.jsonl", held_out_text(cfg, zoo.vocab, cfg.text_docs))
        if cfg.planted:
            planted.write_map(cfg.relations(), tmp / "planted.json")
            _write_jsonl(tmp / "relations.jsonl",
                         held_out_text(cfg, zoo.vocab, cfg.text_docs, offset=20_000, bos=False))
        else:  # relations it never saw, for a relation stage that needs no AGENDA and no spaCy pipeline
            write_untrained(cfg, zoo.vocab, tmp)
        tables.write_rows(zoo.curve, TRAINING_SCHEMA, tmp / "training.parquet")
        manifest = {"model_id": cfg.model_id, "kind": cfg.kind, "config": asdict(cfg), "tokens_per_step": cfg.tokens_per_step,
                    "vocab_size": len(zoo.vocab), "train_seconds": round(zoo.seconds, 1),
                    "commits": {str(k): v for k, v in commits.items()}}
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_jsonl(path: Path, texts: Sequence[str]) -> None:
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def read_manifest(zoo_dir: str | Path) -> dict:
    """The zoo's ``zoo.json``, with a clear error when the zoo was never built."""
    path = Path(zoo_dir) / "zoo.json"
    if not path.is_file():
        raise FileNotFoundError(f"no toy zoo at {zoo_dir}; build it with `icl-dynamics toy-zoo --out {zoo_dir}`")
    return json.loads(path.read_text())



# The zoos as shipped. In the relations zoo (seed 1) the loss on the planted tails falls most steeply
# between steps 1,050 and 1,100, and the lookup heads form there.
ZOOS = {
    TOY: ToyConfig(),
    TOY_RELATIONS: ToyConfig(
        planted=True, model_id=RELATIONS_MODEL_ID, log_every=10,
        steps=(0, 100, 200, 400, 600, 800, 900, 950, 1000, 1050, 1100, 1150, 1200, 1300, 1400, 1600)),
}
