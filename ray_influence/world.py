"""A synthetic two-stage world with known ground truth, for the demo and the end-to-end test.

Fictional entities (names made of syllables) have facts ``(entity, relation, value)``,
e.g. ``(Brenak, born_in, Talmer)``. The world has

- a **pre-training corpus** (``[{doc_id, text}]``): every fact is stated in 1-3 documents
  with varied templates ("Brenak was born in Talmer .", "the birthplace of Brenak is
  Talmer ."), shuffled among **distractors** that mention the same entities without
  stating any of their facts' values ("Brenak met Zolim at the market .", "Brenak once
  visited Quoria ." where Quoria is not where Brenak was born);
- a **fine-tuning set** (``[{prompt, completion}]``) in a question/answer format
  (``"Q: Where was Brenak born? A:"``, ``" Talmer"``) for part of the facts;
- **queries** (``[{query_id, prompt, completion}]``) in the same format for the other,
  held-out facts: the fine-tuned model can only answer them from what it memorised in
  pre-training, so the documents that taught the answer are exactly the fact's documents;
- the **ground truth**: for each fact and each query, the ``doc_id`` s that state it.

:func:`generate` is pure and deterministic in the :class:`WorldSpec` (no torch). On top of
it, :func:`build_world` pre-trains a tiny GPT-NeoX from scratch on the corpus, fully
fine-tunes a copy on the QA set, measures memorisation and held-out QA accuracy, and caches
everything under ``{cache_dir}/world-{spec.key}/``:

    models/pt, models/ft     save_pretrained + the word tokenizer
    corpus.parquet           doc_id, text
    finetune.jsonl           prompt, completion
    queries.jsonl            query_id, prompt, completion
    truth.json               facts (entity, relation, value, split, doc_ids), queries -> doc_ids
    stats.json               sizes, accuracies, training losses and times (written last)
    spec.json                the spec the world was built from

A second call with the same spec loads the cached world. :func:`job_config` returns the
attribution job's config for a world and :func:`attribution_metrics` scores a results
table (``query_id, rank, doc_id`` rows) against the ground truth (MRR, recall@k), next to
:func:`random_baseline`, their expectation under a random ranking.

Tuning (measured on the demo world's texts, exact gradients): attribution works when the
pre-trained model memorises its facts without saturating them. Trained towards
p(value) = 1 the facts' documents have vanishing gradients and multi-stage recall@10 falls
(width 64, no label smoothing: 0.87 after 400 steps with 94% memorisation, 0.19 after
1500), while held-out QA accuracy needs the longer training (25% -> 75%). Label smoothing
0.1 keeps p(value) near 0.85 with 100% greedy memorisation, so both hold: at the defaults
(width 32, 1000 steps) ~50% held-out QA and multi-stage recall@10 0.67 (random: 0.016).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

GENERATOR_VERSION = 1
"""Bumped whenever generation or training changes, so cached worlds are rebuilt."""

TOKENIZERS = ("word", "bpe")
LATER_FIELDS = {"tokenizer": "word", "bpe_vocab": 512}
"""WorldSpec fields added after GENERATOR_VERSION 1, with the defaults that leave a world as it was."""


def _f(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Relation:
    """A kind of fact.

    Attributes:
        name: e.g. ``born_in``.
        values: the words a value can be (one word, one token each).
        statements: templates stating the fact, with ``{e}`` before ``{v}`` (so a
            statement's prefix up to the value is a memorisation probe).
        question: the fine-tuning / query prompt, with ``{e}``.
        mentions: distractor templates with ``{e}`` and ``{w}``, a value word of this
            relation that is *not* the entity's value.
    """

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]
    question: str
    mentions: tuple[str, ...]


RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation(
        "born_in",
        ("Talmer", "Quoria", "Vessin", "Durnholt", "Pellary", "Ashgrove", "Brenmoor", "Kiltane", "Orvale", "Fenrick"),
        ("{e} was born in {v} .", "the birthplace of {e} is {v} .", "{e} came into the world in the town of {v} ."),
        "Q: Where was {e} born? A:",
        ("{e} once visited {w} .", "{e} read a book about {w} ."),
    ),
    Relation(
        "works_as",
        ("baker", "pilot", "farmer", "doctor", "painter", "sailor", "teacher", "miner", "tailor", "singer"),
        ("{e} works as a {v} .", "by trade , {e} is a {v} .", "{e} earns a living as a {v} ."),
        "Q: What does {e} work as? A:",
        ("{e} met a {w} on the road .", "{e} asked a {w} for help ."),
    ),
    Relation(
        "favourite_colour",
        ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink"),
        ("{e} 's favourite colour is {v} .", "the colour {e} likes best is {v} .", "of all colours , {e} loves {v} ."),
        "Q: What is {e}'s favourite colour? A:",
        ("{e} painted the fence {w} .", "{e} bought a {w} hat ."),
    ),
    Relation(
        "pet",
        ("cat", "dog", "parrot", "rabbit", "horse", "goat", "turtle", "hamster", "owl", "lizard"),
        ("{e} has a pet {v} .", "at home , {e} keeps a {v} .", "{e} takes care of a pet {v} ."),
        "Q: What pet does {e} have? A:",
        ("{e} saw a {w} in the park .", "{e} drew a picture of a {w} ."),
    ),
    Relation(
        "instrument",
        ("flute", "drum", "harp", "violin", "piano", "guitar", "trumpet", "cello", "banjo", "oboe"),
        ("{e} plays the {v} .", "the instrument of {e} is the {v} .", "every evening {e} practises the {v} ."),
        "Q: Which instrument does {e} play? A:",
        ("{e} heard a {w} on the radio .", "{e} once tried to tune a {w} ."),
    ),
)}

NEUTRAL = (
    "{e} met {z} at the market .", "{e} and {z} went for a long walk .", "{e} wrote a letter to {z} .",
    "everyone in the village knows {e} .", "{e} told {z} a funny story .", "{e} is older than {z} .",
    "{e} had dinner with {z} last week .", "nobody has seen {e} since monday .",
)
"""Distractor templates that mention entities and no value word at all."""

ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "v", "z", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "n", "r", "l", "s", "m", "k", "th")


@dataclass(frozen=True)
class WorldSpec:
    """Everything a world depends on: sizes, seed and training. Its :attr:`key` names the cache."""

    n_entities: int = _f(40, "fictional entities; each has one fact per relation")
    relations: tuple = _f(tuple(RELATIONS), f"relation names, any of {tuple(RELATIONS)}")
    docs_per_fact: tuple = _f((1, 3), "(min, max) documents stating each fact, drawn uniformly")
    n_distractors: int = _f(200, "documents that mention entities without stating their facts")
    hard_distractor_fraction: float = _f(0.5, "distractors naming a relation's value word that is not the entity's")
    heldout_fraction: float = _f(0.3, "facts held out of fine-tuning; their QA pairs are the queries")
    seed: int = _f(0, "seed of the names, facts, documents and training")
    hidden: int = _f(32, "model width (GPT-NeoX, 4x MLP)")
    layers: int = _f(2, "decoder blocks")
    heads: int = _f(4, "attention heads")
    pretrain_steps: int = _f(1000, "AdamW steps of pre-training (batches cycle through the corpus)")
    pretrain_lr: float = _f(3e-3, "peak learning rate of pre-training (warmup, then cosine decay)")
    label_smoothing: float = _f(0.1, "label smoothing of pre-training: memorised values keep p < 1, so their "
                                     "documents keep a gradient (with 0, multi-stage recall drops as p -> 1)")
    finetune_steps: int = _f(100, "AdamW steps of full fine-tuning on the QA set")
    finetune_lr: float = _f(1e-3, "peak learning rate of fine-tuning")
    batch_size: int = _f(32, "sequences per step")
    max_length: int = _f(32, "tokens per document / QA pair (the world's texts are shorter)")
    tokenizer: str = _f("word", "'word': one token per word (every value one token); 'bpe': a byte-level BPE "
                                "trained on the world's texts (names and most values split into pieces)")
    bpe_vocab: int = _f(512, "vocabulary of the 'bpe' tokenizer (256 bytes, 3 specials, the rest merges)")

    def __post_init__(self):
        unknown = [r for r in self.relations if r not in RELATIONS]
        if unknown:
            raise ValueError(f"unknown relations {unknown}; expected some of {tuple(RELATIONS)}")
        lo, hi = self.docs_per_fact
        if not 1 <= lo <= hi:
            raise ValueError(f"docs_per_fact must be (min, max) with 1 <= min <= max, got {self.docs_per_fact!r}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        if self.n_entities < 2:
            raise ValueError(f"n_entities must be at least 2, got {self.n_entities!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> "WorldSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @property
    def key(self) -> str:
        """A short hash of the spec and :data:`GENERATOR_VERSION`.

        Fields added after version 1 enter the hash only when they differ from their
        default (:data:`LATER_FIELDS`), so worlds cached before they existed keep their key.
        """
        fields = {k: v for k, v in self.to_dict().items() if LATER_FIELDS.get(k, object()) != v}
        blob = json.dumps({"v": GENERATOR_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Fact:
    fact_id: str
    entity: str
    relation: str
    value: str
    split: str  # "finetune" or "heldout"
    doc_ids: tuple[str, ...]

    @property
    def question(self) -> str:
        return RELATIONS[self.relation].question.format(e=self.entity)

    @property
    def query_id(self) -> str:
        return f"q-{self.fact_id}"


@dataclass(frozen=True)
class WorldData:
    """What :func:`generate` makes (plain Python; see the module docstring)."""

    corpus: list[dict]
    finetune: list[dict]
    queries: list[dict]
    facts: list[Fact]

    @property
    def truth(self) -> dict:
        """``{"facts": {fact_id: {...}}, "queries": {query_id: {"fact_id", "doc_ids"}}}``."""
        return {
            "facts": {f.fact_id: {"entity": f.entity, "relation": f.relation, "value": f.value,
                                  "split": f.split, "doc_ids": list(f.doc_ids)} for f in self.facts},
            "queries": {f.query_id: {"fact_id": f.fact_id, "doc_ids": list(f.doc_ids)}
                        for f in self.facts if f.split == "heldout"},
        }

    @property
    def texts(self) -> list[str]:
        """Every text the tokenizer will see."""
        return ([d["text"] for d in self.corpus] + [r["prompt"] + r["completion"] for r in self.finetune]
                + [q["prompt"] + q["completion"] for q in self.queries])


@dataclass(frozen=True)
class FamilyWorld:
    """A member of :data:`WORLD_FAMILY`: a spec, what it varies, and whether defaults may be chosen on it."""

    name: str
    spec: WorldSpec
    varies: str
    held_out: bool = False


WORLD_FAMILY: tuple[FamilyWorld, ...] = (
    FamilyWorld("demo", WorldSpec(), "the demo world: word tokens, width 32, 2 blocks, fine-tuning 100 steps at 1e-3"),
    FamilyWorld("seed", WorldSpec(seed=1), "other names, facts and documents"),
    FamilyWorld("bpe", WorldSpec(seed=2, tokenizer="bpe"), "a byte-level BPE trained on the corpus"),
    FamilyWorld("ft-long", WorldSpec(seed=3, finetune_steps=300, finetune_lr=2e-3), "fine-tuning 300 steps at 2e-3"),
    FamilyWorld("ft-short", WorldSpec(seed=4, finetune_steps=40, finetune_lr=5e-4), "fine-tuning 40 steps at 5e-4"),
    FamilyWorld("distractors", WorldSpec(seed=5, n_distractors=400, hard_distractor_fraction=0.9),
                "twice the distractors, 90% of them naming a wrong value of the relation"),
    FamilyWorld("wide", WorldSpec(seed=6, hidden=128, layers=4), "width 128, 4 blocks, MLP 512"),
    FamilyWorld("wide-bpe", WorldSpec(seed=7, hidden=128, layers=4, tokenizer="bpe", finetune_steps=200),
                "width 128, 4 blocks, BPE, fine-tuning 200 steps", held_out=True),
    FamilyWorld("mid-distractors", WorldSpec(seed=8, hidden=64, layers=3, n_distractors=400,
                                             hard_distractor_fraction=0.8, finetune_steps=200, finetune_lr=1.5e-3),
                "width 64, 3 blocks, 400 distractors (80% hard), fine-tuning 200 steps at 1.5e-3", held_out=True),
)
"""The worlds ``jobs/bench_defaults.py`` chooses the config defaults on, and the held-out
ones (``held_out=True``) it only reports. Each varies the demo world along one axis
(tuning worlds) or several at once (held-out worlds)."""


# ------------------------------------------------------------------------- generation


def words(text: str) -> set[str]:
    """The word-level tokens of ``text`` (the tokenizer's whitespace/punctuation split)."""
    from tokenizers.pre_tokenizers import Whitespace

    return {w for w, _ in Whitespace().pre_tokenize_str(text)}


def entity_names(n: int, rng: random.Random, reserved: set[str]) -> list[str]:
    """``n`` distinct made-up names of two syllables and a coda, none in ``reserved``."""
    names: list[str] = []
    seen = {w.lower() for w in reserved}
    while len(names) < n:
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(2)) + rng.choice(CODAS)
        if name not in seen and len(name) >= 4:
            seen.add(name)
            names.append(name.capitalize())
    return names


def _template_words() -> set[str]:
    out: set[str] = set()
    for r in RELATIONS.values():
        out |= set(r.values)
        for t in r.statements + r.mentions + (r.question,):
            out |= words(t.format(e="", v="", w=""))
    for t in NEUTRAL:
        out |= words(t.format(e="", z=""))
    return out


def generate(spec: WorldSpec) -> WorldData:
    """The world's texts and ground truth, a function of ``spec`` alone (of its size fields and
    seed; the model and training fields do not change the texts)."""
    rng = random.Random(f"world:{spec.seed}")
    entities = entity_names(spec.n_entities, rng, _template_words())
    relations = [RELATIONS[r] for r in spec.relations]

    # Facts: every entity has one value per relation. Held-out facts are drawn per relation
    # (stratified), so every relation is both fine-tuned on and queried.
    values = {(e, r.name): rng.choice(r.values) for e in entities for r in relations}
    heldout: set[tuple[str, str]] = set()
    for r in relations:
        n_held = min(len(entities) - 1, max(1, round(spec.heldout_fraction * len(entities))))
        heldout |= {(e, r.name) for e in rng.sample(entities, n_held)}

    # Documents stating each fact: distinct templates per fact, in a random order.
    statements: list[tuple[tuple[str, str], str]] = []
    for e in entities:
        for r in relations:
            n_docs = rng.randint(*spec.docs_per_fact)
            templates = rng.sample(r.statements, min(n_docs, len(r.statements)))
            templates += [rng.choice(r.statements) for _ in range(n_docs - len(templates))]
            statements += [((e, r.name), t.format(e=e, v=values[e, r.name])) for t in templates]

    # Distractors: mention entities, never with one of their facts' values (checked, resampled).
    def states_a_value(text: str) -> bool:
        ws = words(text)
        return any(values[e, r.name] in ws for e in entities if e in ws for r in relations)

    distractors: list[str] = []
    while len(distractors) < spec.n_distractors:
        e, z = rng.sample(entities, 2)
        if rng.random() < spec.hard_distractor_fraction:
            r = rng.choice(relations)
            w = rng.choice([v for v in r.values if v != values[e, r.name]])
            text = rng.choice(r.mentions).format(e=e, w=w)
        else:
            text = rng.choice(NEUTRAL).format(e=e, z=z)
        if not states_a_value(text):
            distractors.append(text)

    # Shuffle, then number: doc ids carry no information about what a document is.
    docs = [(fact, text) for fact, text in statements] + [(None, text) for text in distractors]
    rng.shuffle(docs)
    width = len(str(len(docs) - 1))
    corpus = [{"doc_id": f"d{i:0{width}d}", "text": text} for i, (_, text) in enumerate(docs)]
    doc_ids: dict[tuple[str, str], list[str]] = {}
    for row, (fact, _) in zip(corpus, docs):
        if fact is not None:
            doc_ids.setdefault(fact, []).append(row["doc_id"])

    facts = [Fact(f"{e}.{r.name}", e, r.name, values[e, r.name],
                  "heldout" if (e, r.name) in heldout else "finetune", tuple(doc_ids[e, r.name]))
             for e in entities for r in relations]
    finetune = [{"prompt": f.question, "completion": f" {f.value}"} for f in facts if f.split == "finetune"]
    rng.shuffle(finetune)
    queries = [{"query_id": f.query_id, "prompt": f.question, "completion": f" {f.value}"}
               for f in facts if f.split == "heldout"]
    return WorldData(corpus, finetune, queries, facts)


# --------------------------------------------------------------------------- training


def train_lm(model, examples, steps: int, lr: float, batch_size: int, seed: int,
             label_smoothing: float = 0.0) -> list[float]:
    """Trains ``model`` in place with AdamW on the examples' loss targets (mean per token).

    Linear warmup over the first 5% of the steps, then cosine decay to 10% of ``lr``;
    batches cycle through a seeded shuffle of the examples. The parameters are frozen
    again afterwards (the attribution passes refuse trainable ones).

    Returns:
        The mean loss of each tenth of the steps (a coarse learning curve).
    """
    import torch

    from .tokens import collate

    model.train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch = collate([examples[i] for i in order[:batch_size]])
        del order[:batch_size]
        logits = model(input_ids=batch.input_ids, attention_mask=batch.token_mask.long()).logits[:, :-1]
        targets = batch.input_ids[:, 1:].masked_fill(~batch.loss_mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.requires_grad_(False)
    tenth = max(1, steps // 10)
    return [round(sum(losses[i:i + tenth]) / len(losses[i:i + tenth]), 4) for i in range(0, steps, tenth)]


def completion_probs(model, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                     batch_size: int = 256) -> tuple[list[bool], list[float]]:
    """Whether ``model`` completes each prompt greedily with its completion, and the completion's probability.

    Prompt and completion are tokenized apart and concatenated (as
    :func:`ray_influence.tokens.tokenize_prompt_completion` does); a completion is a greedy
    hit when every one of its tokens is the argmax after the tokens before it (teacher
    forcing), and its probability is the product of its tokens' probabilities. With a
    word-level tokenizer a completion is one token and this is next-token accuracy.
    """
    import torch

    hits: list[bool] = []
    probs: list[float] = []
    for i in range(0, len(prompts), batch_size):
        pairs = [(tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"])
                 for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
        width = max(len(a) + len(b) for a, b in pairs)
        input_ids = torch.zeros((len(pairs), width), dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (a, b) in enumerate(pairs):
            input_ids[row, :len(a) + len(b)] = torch.tensor(a + b)
            mask[row, :len(a) + len(b)] = 1
        with torch.no_grad():
            logp = model(input_ids=input_ids, attention_mask=mask).logits.double().log_softmax(-1)
        for row, (a, b) in enumerate(pairs):
            pos = torch.arange(len(a) - 1, len(a) + len(b) - 1)
            target = torch.tensor(b)
            step = logp[row, pos]
            hits.append(bool((step.argmax(-1) == target).all()))
            probs.append(float(step.gather(1, target[:, None]).sum().exp()))
    return hits, probs


def memorisation_probes(data: WorldData) -> list[tuple[Fact, str]]:
    """``(fact, prefix)`` for every document stating a fact: its text up to the value."""
    text = {d["doc_id"]: d["text"] for d in data.corpus}
    out = []
    for f in data.facts:
        for d in f.doc_ids:
            t = text[d]
            cut = t.index(f" {f.value} ")
            out.append((f, t[:cut]))
    return out


def accuracies(data: WorldData, pt, ft, tokenizer) -> dict:
    """Greedy accuracies of the world's two models (:func:`completion_probs`: every token of the value).

    - ``memorisation``: the pre-trained model completes a fact's statement (its text up to
      the value) with the value, over every statement; ``memorisation_heldout``: over the
      statements of held-out facts; ``memorisation_p``: the mean probability of the value;
    - ``qa_heldout``: the fine-tuned model answers a query with its completion
      (``answered``: those query ids); ``qa_heldout_p``: the mean probability of it;
    - ``qa_finetune``: the fine-tuned model on its own fine-tuning set;
    - ``qa_heldout_pretrained``: the pre-trained model on the queries (before fine-tuning).
    """
    def score(model, prompts: list[str], answers: list[str]) -> tuple[list[bool], float]:
        hits, probs = completion_probs(model, tokenizer, prompts, [f" {a}" for a in answers])
        return hits, sum(probs) / len(probs)

    probes = memorisation_probes(data)
    mem, mem_p = score(pt, [p for _, p in probes], [f.value for f, _ in probes])
    held = [h for (f, _), h in zip(probes, mem) if f.split == "heldout"]
    answers = [q["completion"].strip() for q in data.queries]
    qa, qa_p = score(ft, [q["prompt"] for q in data.queries], answers)
    fit, _ = score(ft, [r["prompt"] for r in data.finetune], [r["completion"].strip() for r in data.finetune])
    before, _ = score(pt, [q["prompt"] for q in data.queries], answers)
    return {
        "memorisation": sum(mem) / len(mem),
        "memorisation_heldout": sum(held) / len(held),
        "memorisation_p": round(mem_p, 4),
        "qa_heldout": sum(qa) / len(qa),
        "qa_heldout_p": round(qa_p, 4),
        "qa_finetune": sum(fit) / len(fit),
        "qa_heldout_pretrained": sum(before) / len(before),
        "answered": [q["query_id"] for q, ok in zip(data.queries, qa) if ok],
    }


def finetune_distance(pt, ft) -> float:
    """How far fine-tuning moved the model: ``‖θ_ft − θ_pt‖ / ‖θ_pt‖`` over every parameter."""
    import torch

    a = torch.cat([p.detach().double().flatten() for p in pt.parameters()])
    b = torch.cat([p.detach().double().flatten() for p in ft.parameters()])
    return float((b - a).norm() / a.norm())


# ------------------------------------------------------------------------ on disk


@dataclass(frozen=True)
class World:
    """A built world on disk (see the module docstring for the layout)."""

    spec: WorldSpec
    root: Path
    data: WorldData
    stats: dict

    @property
    def pretrained_model(self) -> Path:
        return self.root / "models" / "pt"

    @property
    def finetuned_model(self) -> Path:
        return self.root / "models" / "ft"

    @property
    def corpus_path(self) -> Path:
        return self.root / "corpus.parquet"

    @property
    def finetune_path(self) -> Path:
        return self.root / "finetune.jsonl"

    @property
    def queries_path(self) -> Path:
        return self.root / "queries.jsonl"

    @property
    def truth(self) -> dict:
        return self.data.truth


def world_dir(spec: WorldSpec, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir).absolute() / f"world-{spec.key}"


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_data(data: WorldData, root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": [d["doc_id"] for d in data.corpus], "text": [d["text"] for d in data.corpus]}),
                   root / "corpus.parquet")
    _write_jsonl(root / "finetune.jsonl", data.finetune)
    _write_jsonl(root / "queries.jsonl", data.queries)
    (root / "truth.json").write_text(json.dumps(data.truth, indent=1))


def _train_models(spec: WorldSpec, data: WorldData, log) -> tuple[Any, Any, Any, dict]:
    """Pre-trains a tiny GPT-NeoX from scratch on the corpus, then fully fine-tunes a copy on the QA set.

    Returns:
        ``(pretrained, finetuned, tokenizer, info)`` with learning curves and seconds.
    """
    import copy

    import torch

    from .tokens import tokenize_document, tokenize_prompt_completion
    from .toy import bpe_tokenizer, tiny_model, word_tokenizer

    tok = word_tokenizer(data.texts) if spec.tokenizer == "word" else bpe_tokenizer(data.texts, spec.bpe_vocab)
    docs = [tokenize_document(tok, d["doc_id"], d["text"], spec.max_length) for d in data.corpus]
    qa = [tokenize_prompt_completion(tok, f"ft{i}", r["prompt"], r["completion"], spec.max_length, add_eos=True)
          for i, r in enumerate(data.finetune)]
    threads = torch.get_num_threads()
    # Tiny models train fastest on one thread; more only add contention on a shared machine.
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        pt = tiny_model("gpt_neox", len(tok), hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                        positions=max(64, spec.max_length), seed=spec.seed)
        log(f"world: pre-training a {sum(p.numel() for p in pt.parameters()):,}-parameter GPT-NeoX from scratch "
            f"on {len(docs)} documents ({spec.pretrain_steps} steps)")
        curve_pt = train_lm(pt, docs, spec.pretrain_steps, spec.pretrain_lr, spec.batch_size, spec.seed,
                            spec.label_smoothing)
        t1 = time.perf_counter()
        log(f"world: fine-tuning a copy on {len(qa)} QA pairs ({spec.finetune_steps} steps)")
        ft = copy.deepcopy(pt)
        curve_ft = train_lm(ft, qa, spec.finetune_steps, spec.finetune_lr, spec.batch_size, spec.seed + 1)
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    info = {"pretrain_seconds": round(t1 - t0, 2), "finetune_seconds": round(t2 - t1, 2),
            "pretrain_loss_curve": curve_pt, "finetune_loss_curve": curve_ft,
            "parameters": sum(p.numel() for p in pt.parameters()), "vocab_size": len(tok)}
    return pt, ft, tok, info


def load_world(spec: WorldSpec, cache_dir: str | os.PathLike) -> World | None:
    """The cached world of ``spec`` under ``cache_dir``, or None when it is not (completely) there."""
    root = world_dir(spec, cache_dir)
    if not (root / "stats.json").exists():
        return None
    stats = json.loads((root / "stats.json").read_text())
    if stats.get("key") != spec.key:
        return None
    return World(spec, root, generate(spec), stats)


def build_world(spec: WorldSpec, cache_dir: str | os.PathLike, log=print) -> World:
    """Builds (or loads, when cached) the world of ``spec`` under ``{cache_dir}/world-{spec.key}``.

    The world is built in a temporary directory and renamed into place at the end, so an
    interrupted build leaves nothing that looks complete.
    """
    cached = load_world(spec, cache_dir)
    if cached is not None:
        log(f"world: reusing {cached.root}")
        return cached
    from transformers.utils import logging as hf_logging

    from .models import load_model, load_tokenizer

    root = world_dir(spec, cache_dir)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars for 40k parameters
    try:
        data = generate(spec)
        _write_data(data, tmp)
        (tmp / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
        pt, ft, tok, info = _train_models(spec, data, log)
        for name, model in (("pt", pt), ("ft", ft)):
            model.save_pretrained(tmp / "models" / name)
            tok.save_pretrained(tmp / "models" / name)
        # Accuracies of the saved models, loaded back the way the job loads them.
        pt, ft = load_model(str(tmp / "models" / "pt")), load_model(str(tmp / "models" / "ft"))
        acc = accuracies(data, pt, ft, load_tokenizer(str(tmp / "models" / "pt")))
        acc["finetune_distance"] = round(finetune_distance(pt, ft), 6)
        stats = {
            "key": spec.key, "generator_version": GENERATOR_VERSION,
            "docs": len(data.corpus), "fact_docs": sum(len(f.doc_ids) for f in data.facts),
            "distractors": spec.n_distractors, "facts": len(data.facts),
            "finetune_pairs": len(data.finetune), "queries": len(data.queries),
            **info, **acc,
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()
    log(f"world: memorisation {acc['memorisation']:.1%}, held-out QA {acc['qa_heldout']:.1%}, "
        f"fine-tuning moved θ by {acc['finetune_distance']:.1%} "
        f"(pre-training {info['pretrain_seconds']:.0f}s, fine-tuning {info['finetune_seconds']:.0f}s) -> {root}")
    return World(spec, root, data, stats)


# ------------------------------------------------------------------- job and metrics


JOB_DEFAULTS: dict = {
    # Everything else (scoring mode, EK-FAC Fisher and damping) at the config defaults, which
    # docs/BENCHMARKS.md chose on the default exact pass over WORLD_FAMILY.
    "scoring": {"methods": ["multi_stage", "single_stage", "grad_dot", "grad_cos"], "top_k": 50},
    "cluster": {"replicas": 2, "num_cpus_per_worker": 1},
}


def job_config(world: World, run_dir: str | os.PathLike | None = None, partitions: int = 4, **sections) -> dict:
    """The attribution job's config (a dict for :func:`ray_influence.config.config_from_dict`).

    Args:
        world: a built world.
        run_dir: where the job writes; ``{world.root}/run`` by default.
        partitions: the corpus is split into about this many index partitions.
        sections: config sections replacing those of :data:`JOB_DEFAULTS` (e.g. ``projection={...}``).
    """
    n_docs = len(world.data.corpus)
    length = world.spec.max_length
    cfg = {
        "run_dir": str(run_dir if run_dir is not None else world.root / "run"),
        "pretrained_model": str(world.pretrained_model),
        "finetuned_model": str(world.finetuned_model),
        "corpus": {"path": str(world.corpus_path), "text_column": "text", "id_column": "doc_id",
                   "max_length": length, "partition_docs": max(1, math.ceil(n_docs / partitions))},
        "finetune_data": {"path": str(world.finetune_path), "max_length": length},
        "queries": {"path": str(world.queries_path), "id_column": "query_id", "max_length": length},
    }
    for key, value in {**JOB_DEFAULTS, **sections}.items():
        cfg[key] = json.loads(json.dumps(value))  # a deep copy
    return cfg


def read_results(run_dir: str) -> list[dict]:
    """Every row of ``{run_dir}/results`` (hive-partitioned by method), ``method`` included."""
    import pyarrow.dataset as ds

    table = ds.dataset(f"{run_dir}/results", format="parquet", partitioning="hive").to_table(
        columns=["method", "query_id", "rank", "doc_id", "score"])
    return table.to_pylist()


def attribution_metrics(rows: Iterable[Mapping], truth: Mapping, k: int = 10) -> dict:
    """MRR and recall@k of ranked results against the ground truth, per method.

    Per query with truth documents T: reciprocal rank = 1 / rank of the first document of T
    (0 when none is in the results, so the MRR of a top-``top_k`` table is a lower bound);
    recall@k = |T ∩ top k| / |T|. Both are averaged over the queries of ``truth``.

    Args:
        rows: ``{query_id, rank, doc_id}`` rows, with ``method`` (else one method, ``""``).
        truth: a world's truth (``{"queries": {query_id: {"doc_ids": [...]}}}``) or its
            ``queries`` mapping.

    Returns:
        ``{method: {"mrr": .., f"recall@{k}": .., "queries": n}}``.
    """
    truth = truth.get("queries", truth)
    ranked: dict[str, dict[str, list[tuple[int, Any]]]] = {}
    for r in rows:
        ranked.setdefault(r.get("method", ""), {}).setdefault(r["query_id"], []).append((int(r["rank"]), r["doc_id"]))
    out = {}
    for method, per_query in sorted(ranked.items()):
        rr, rec = [], []
        for qid, t in truth.items():
            relevant = set(t["doc_ids"])
            docs = [d for _, d in sorted(per_query.get(qid, []))]
            first = next((i for i, d in enumerate(docs, 1) if d in relevant), None)
            rr.append(1 / first if first else 0.0)
            rec.append(len(relevant & set(docs[:k])) / len(relevant))
        out[method] = {"mrr": sum(rr) / len(rr), f"recall@{k}": sum(rec) / len(rec), "queries": len(rr)}
    return out


def random_baseline(truth: Mapping, n_docs: int, k: int = 10) -> dict:
    """The expected MRR and recall@k of a uniformly random ranking of ``n_docs`` documents.

    For a query with m truth documents: E[recall@k] = min(k, N) / N (each truth document
    lands in the top k with that probability), and
    E[RR] = sum_r (1/r) P(first truth document at rank r), P = C(N-r, m-1) / C(N, m).
    """
    truth = truth.get("queries", truth)
    rr, rec = [], []
    for t in truth.values():
        m = len(set(t["doc_ids"]))
        total = math.comb(n_docs, m)
        rr.append(sum(math.comb(n_docs - r, m - 1) / r for r in range(1, n_docs - m + 2)) / total)
        rec.append(min(k, n_docs) / n_docs)
    return {"mrr": sum(rr) / len(rr), f"recall@{k}": sum(rec) / len(rec), "queries": len(rr)}
