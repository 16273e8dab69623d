"""``ray-influence report``: a self-contained HTML page, rendered in headless Chromium.

The screenshot is kept as a test artefact in ``test-artifacts/report.png`` (gitignored).
"""

from __future__ import annotations

import html.parser
import shutil
import struct
import subprocess
from collections import defaultdict
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from test_token_influence import shared_run
from ray_influence.cli import main

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
    return shared_run(tmp_path_factory, request)


@pytest.fixture(scope="module")
def page(run, tmp_path_factory) -> tuple[Path, dict]:
    """The report of a copy of the shared run, written where it goes by default."""
    root, cfg = run
    copy = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(root / "run", copy)
    assert main(["report", str(copy)]) == 0
    return copy / "report.html", cfg


def chromium() -> str:
    exe = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")) if p
                and Path(p).exists()), None)
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    return exe


class Page(html.parser.HTMLParser):
    """The parts of a rendered DOM the test looks at."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, list[dict]] = defaultdict(list)
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag].append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def top_rows(run_dir: str, n: int) -> list[dict]:
    rows = ds.dataset(f"{run_dir}/results", format="parquet", partitioning="hive").to_table().to_pylist()
    return [r for r in rows if r["rank"] <= n]


def test_page_is_self_contained(page):
    path, _ = page
    text = path.read_text()
    assert text.startswith("<!doctype html>")
    for external in ("http://", "https://", "<script", "<link", "src=", "url(", "@import"):
        assert external not in text, external


def test_chromium_renders_queries_documents_tokens_and_plots(page, tmp_path):
    path, cfg = page
    exe = chromium()
    common = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"]
    dom = subprocess.run([*common, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    subprocess.run([*common, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True)

    parsed = Page()
    parsed.feed(dom)
    text = " ".join(" ".join(parsed.text).split())
    methods = cfg["scoring"]["methods"]
    assert [s["data-query-id"] for s in parsed.tags["section"]] == ["q0", "q1", "q2"]
    assert "Query q0" in text and "Query q2" in text
    # Every method's block, with its top documents (at most --docs 10; top_k is 5) in rank order.
    assert [d["data-method"] for d in parsed.tags["details"]] == methods * 3
    docs = [(li["data-doc-id"], int(li["data-rank"])) for li in parsed.tags["li"] if "data-doc-id" in li]
    assert len(docs) == 3 * len(methods) * cfg["scoring"]["top_k"]
    for r in top_rows(cfg["run_dir"], cfg["scoring"]["top_k"]):
        assert (str(r["doc_id"]), r["rank"]) in docs
        assert " ".join(r["doc_text"].split()) in text  # the document's words, as tokens or plain text
    # Shaded tokens for the documents with per-token influence: the top 3 of each query and method.
    shaded = [s for s in parsed.tags["span"] if s.get("class") == "tok"]
    assert len({s["style"] for s in shaded}) > 10 and all(s["style"].startswith("background:rgba(") for s in shaded)
    assert any(float(s["style"].rsplit(",", 1)[1].rstrip(")")) > 0.5 for s in shaded)
    # Two plots per (query, method): the score histogram and the per-block contributions.
    svgs = [s.get("class") for s in parsed.tags["svg"]]
    assert svgs.count("score-hist") == svgs.count("layer-plot") == 3 * len(methods)
    assert len(parsed.tags["rect"]) >= 3 * len(methods) * (1 + 2)  # >= 1 histogram bar + 2 blocks each
    assert "block 0" in text and "block 1" in text
    # The screenshot: a 1200 x 2000 PNG with something on it.
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1200, 2000)
    assert len(data) > 20_000


def test_prompt_and_completion_are_on_the_page(page):
    path, cfg = page
    import json

    parsed = Page()
    parsed.feed(path.read_text())
    text = " ".join(parsed.text)
    for line in Path(cfg["queries"]["path"]).read_text().splitlines():
        q = json.loads(line)
        assert q["prompt"] in text and q["completion"] in text


def test_out_option_and_bad_run_dir(run, tmp_path, capsys):
    root, cfg = run
    out = tmp_path / "elsewhere.html"
    assert main(["report", cfg["run_dir"], "--out", str(out), "--docs", "2"]) == 0
    assert out.read_text().count('class="doc"') == 3 * len(cfg["scoring"]["methods"]) * 2
    assert not (root / "run" / "report.html").exists()  # --out: nothing written into the run
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a ray-influence run directory" in err and len(err.strip().splitlines()) == 1


def test_run_without_results_exits_2(run, tmp_path, capsys):
    root, _ = run
    (tmp_path / "r").mkdir()
    shutil.copy(root / "run" / "run.json", tmp_path / "r" / "run.json")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "r")]) == 2
    assert "no results yet" in capsys.readouterr().err
