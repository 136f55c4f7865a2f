"""An index written by older code (tests/fixtures/index_v1, see its README) opens, searches and verifies."""

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from retrieval.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "index_v1"


def _copy(tmp_path) -> Path:
    dst = tmp_path / "old"
    shutil.copytree(FIXTURE, dst)
    return dst / "idx"


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_old_index_info_search_verify(tmp_path):
    idx = _copy(tmp_path)
    r = _run("info", "--index", str(idx), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["images"] == 3 and info["captions"] == 3
    assert info["model"] == "tiny-clip:none" and info["dim"] == 64

    r = _run("search", "photo number 1", "--index", str(idx), "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(Path(h["path"]).name for h in hits) == ["img_0000.png", "img_0001.png", "img_0002.png"]

    r = _run("search", "photo", "--index", str(idx), "--to", "captions", "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    assert {json.loads(line)["caption"] for line in r.stdout.splitlines()} == {f"photo number {i}" for i in range(3)}

    r = _run("verify", "--index", str(idx))
    assert r.exit_code == 0, r.output
