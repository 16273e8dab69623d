"""A small end-to-end example of the library in one process (no Ray).

Builds a tiny GPT-NeoX and a word tokenizer from configs, pre-trains it on a toy corpus
of facts, fine-tunes a copy on question/answer pairs, saves both with
``save_pretrained`` and loads them back with ``from_pretrained``, fits EK-FAC factors for
both stages, and prints the top pre-training documents of a few queries by multi-stage
influence.
"""

from __future__ import annotations

import os
import time

import torch

from .attribution import document_gradients, fit_factors, influence_scores
from .models import load_model, load_tokenizer
from .modules import find_tracked_modules
from .projection import make_projection
from .scoring import Method, top_k
from .tokens import tokenize_document, tokenize_prompt_completion
from .toy import tiny_model, train, word_tokenizer

PEOPLE = ["alva", "brin", "cato", "dara", "elko", "fenn", "gila", "hale"]
CITIES = ["oslo", "lima", "kiev", "rome", "baku", "doha", "riga", "bern"]
FOODS = ["rice", "figs", "kale", "plum", "corn", "nuts", "eggs", "lamb"]


def toy_corpus() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(corpus [(doc_id, text)], fine-tune [(prompt, completion)], queries [(id, prompt, completion)])."""
    corpus, finetune, queries = [], [], []
    for i, p in enumerate(PEOPLE):
        city, food = CITIES[i], FOODS[(i * 3) % len(FOODS)]
        corpus.append((f"{p}-city", f"{p} lives in {city} ."))
        corpus.append((f"{p}-food", f"{p} likes to eat {food} ."))
        corpus.append((f"{p}-noise", f"{p} met {PEOPLE[(i + 1) % len(PEOPLE)]} on a sunny day ."))
        if i < 5:
            finetune.append((f"where does {p} live ?", f" {city}"))
        else:
            queries.append((f"q-{p}", f"where does {p} live ?", f" {city}"))
    return corpus, finetune, queries


def run_example(workdir: str, seed: int = 0) -> dict:
    """Runs the example under ``workdir``; returns the top-3 documents per query."""
    t0 = time.perf_counter()
    corpus, finetune, queries = toy_corpus()
    texts = [t for _, t in corpus] + [p + c for p, c in finetune] + [p + c for _, p, c in queries]
    tok = word_tokenizer(texts)
    docs = [tokenize_document(tok, i, t, 64) for i, t in corpus]
    ft_examples = [tokenize_prompt_completion(tok, f"ft{i}", p, c, 64, add_eos=True) for i, (p, c) in enumerate(finetune)]

    pt_dir, ft_dir = os.path.join(workdir, "models", "pt"), os.path.join(workdir, "models", "ft")
    model = train(tiny_model("gpt_neox", len(tok), hidden=32, layers=2, heads=4, seed=seed), docs, steps=150)
    model.save_pretrained(pt_dir)
    tok.save_pretrained(pt_dir)
    model = train(model, ft_examples, steps=40, lr=1e-3)
    model.save_pretrained(ft_dir)
    tok.save_pretrained(ft_dir)

    pt, ft = load_model(pt_dir, "float64"), load_model(ft_dir, "float64")
    tok = load_tokenizer(ft_dir)
    specs = find_tracked_modules(pt)
    names = list(specs)
    factors_pt = fit_factors(pt, docs, specs, seed=seed)
    factors_ft = fit_factors(ft, ft_examples, specs, seed=seed)
    projs = {n: make_projection(s, 32, seed=seed) for n, s in specs.items()}
    index = document_gradients(pt, docs, specs, projs)
    q_examples = [tokenize_prompt_completion(tok, q, p, c, 64, add_eos=False) for q, p, c in queries]
    q_grads = document_gradients(ft, q_examples, specs).grads
    s = influence_scores(Method.MULTI_STAGE, q_grads, index.grads, names, factors_ft, factors_pt, projs)
    values, idx = top_k(s, 3)
    texts_by_id = dict(corpus)
    out = {}
    for qi, (qid, prompt, completion) in enumerate(queries):
        top = [(index.keys[j], float(v)) for v, j in zip(values[qi], idx[qi])]
        out[qid] = top
        print(f"\n{qid}: {prompt}{completion}")
        for rank, (doc_id, score) in enumerate(top, 1):
            print(f"  {rank}. {score:+.4e}  {doc_id:<12} {texts_by_id[doc_id]!r}")
    print(f"\n{len(docs)} documents, {len(specs)} tracked modules, {time.perf_counter() - t0:.1f}s")
    return out
