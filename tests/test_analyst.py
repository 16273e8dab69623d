"""README.md, section "Analysts": every ```python block runs, in order, against a real finished run.

The blocks name the run ``runs/demo``; here that is replaced by the shared test run's
``run_dir``. A block right after ``<!-- not run by tests/test_analyst.py ... -->`` is skipped.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from test_token_influence import TOP, shared_run

DOC = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- not run by tests/test_analyst\.py[^>]*-->\s*)?```python\n(.*?)```", re.S)


def analyst_section() -> str:
    text = DOC.read_text()
    start = text.index("\n## Analysts\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def python_blocks() -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(analyst_section()) if not m.group(1)]


@pytest.fixture(scope="module")
def executed(tmp_path_factory, request) -> tuple[dict, str, dict]:
    """Runs the blocks in one namespace; returns it, their output, and the run's config."""
    root, cfg = shared_run(tmp_path_factory, request)
    namespace: dict = {"__name__": "analyst"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in python_blocks():
            exec(compile(code.replace("runs/demo", cfg["run_dir"]), str(DOC), "exec"), namespace)
    return namespace, out.getvalue(), cfg


def test_doc_has_duckdb_polars_and_pyarrow_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 4
    for lib in ("import duckdb", "import polars", "import pyarrow.dataset"):
        assert any(lib in b for b in blocks), lib
    assert "## Analysts" in DOC.read_text()


def test_duckdb_examples(executed):
    ns, out, cfg = executed
    methods = cfg["scoring"]["methods"]
    top = ns["top"].fetchall()
    assert len(top) == len(methods) * cfg["scoring"]["top_k"]
    assert {r[0] for r in top} == set(methods)
    rows = ns["check"].fetchall()  # (method, query, rank, doc, score, token_sum)
    assert len(rows) == len(methods) * 3 * TOP
    for r in rows:
        assert r[5] == pytest.approx(r[4], rel=1e-6, abs=1e-9 * max(1.0, abs(r[4])))
    assert len(ns["top_tokens"].fetchall()) == 10
    assert {r[1] for r in ns["layers"].fetchall()} == {0, 1}
    assert "duplicate_id" in out and "missing_text" in out


def test_polars_examples(executed):
    ns, _, cfg = executed
    assert ns["top3"].height == len(cfg["scoring"]["methods"]) * 3 * 3
    strongest = ns["strongest"]
    assert strongest.height == 3 * TOP
    for row in strongest.iter_rows(named=True):
        assert row["token_sum"] == pytest.approx(row["score"], rel=1e-6)


def test_pyarrow_examples(executed):
    ns, out, cfg = executed
    assert ns["table"].num_rows == 3 * 3
    assert sorted(ns["best"]) == ["q0", "q1", "q2"]
    assert ns["meta"]["pretrained_model"] == cfg["pretrained_model"]
    assert "q0 " in out
