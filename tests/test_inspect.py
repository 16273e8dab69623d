"""``ray-influence inspect``: stages, counts, skipped documents by reason, timings; exit 2 off a run."""

from __future__ import annotations

import json
import shutil

import pytest

from test_token_influence import shared_run
from ray_influence.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
    return shared_run(tmp_path_factory, request)


def inspect(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["inspect", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_prints_stages_counts_and_skipped(run, capsys):
    root, cfg = run
    code, out, _ = inspect(capsys, cfg["run_dir"])
    assert code == 0
    lines = out.splitlines()
    for stage in ("fit", "index", "query", "score", "tokens"):
        line = next(x for x in lines if x.startswith(stage + " "))
        assert " done " in line and line.split()[2].endswith("s"), line  # status, then seconds
    assert "documents  20 indexed, 3 skipped" in out
    assert "partitions 5 (5 indexed)" in out  # 20 docs in 6s, plus the 3-row file
    assert "queries    3" in out
    skipped = lines[lines.index("skipped by reason") + 1:]
    assert [x.split() for x in skipped] == [["duplicate_id", "1"], ["empty_text", "1"], ["missing_text", "1"]]


def test_inspect_json(run, capsys):
    root, cfg = run
    code, out, _ = inspect(capsys, cfg["run_dir"], "--json")
    assert code == 0
    info = json.loads(out)
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    assert {n: s["status"] for n, s in info["stages"].items()} == dict.fromkeys(
        ("fit", "index", "query", "score", "tokens"), "done")
    assert {n: s["seconds"] for n, s in info["stages"].items()} == {n: s["seconds"] for n, s in manifest["stages"].items()}
    assert info["documents"] == {"indexed": 20, "skipped": 3}
    assert info["queries"] == 3
    assert info["partitions"]["total"] == info["partitions"]["indexed"] == 5
    assert info["skipped_by_reason"] == {"duplicate_id": 1, "empty_text": 1, "missing_text": 1}
    assert info["results_rows"] == dict.fromkeys(cfg["scoring"]["methods"], 15)  # 3 queries x top 5


def test_inspect_a_crashed_run_shows_what_it_finished(run, tmp_path, capsys):
    """No manifest (the job died before its end), one index piece and one result missing."""
    root, cfg = run
    copy = tmp_path / "run"
    shutil.copytree(root / "run", copy)
    (copy / "manifest.json").unlink()
    piece = sorted((copy / "index" / "pretrained" / "shard-0").glob("*.safetensors"))[0]
    piece.with_name(piece.name + ".json").unlink()  # no marker: not done
    shutil.rmtree(copy / "results" / "method=grad_cos")
    code, out, _ = inspect(capsys, str(copy), "--json")
    info = json.loads(out)
    assert code == 0
    assert info["stages"]["index"] == {"status": "partial (4/5)", "seconds": None, "finished": None}
    assert info["stages"]["score"]["status"] == "partial (3/4)"
    assert info["stages"]["fit"]["status"] == "done"


@pytest.mark.parametrize("what", ["empty_dir", "missing", "file"])
def test_not_a_run_exits_2_with_one_message(what, tmp_path, capsys):
    path = {"empty_dir": tmp_path, "missing": tmp_path / "nope", "file": tmp_path / "f.txt"}[what]
    if what == "file":
        path.write_text("x")
    code, out, err = inspect(capsys, str(path))
    assert code == 2 and out == ""
    assert err.startswith("ray-influence: error: ") and len(err.strip().splitlines()) == 1
    assert ("does not exist" if what == "missing" else "not a ray-influence run directory") in err
