"""A corpus of malformed and odd files: every file is indexed correctly or skipped with its reason
recorded (errors table and the run's report), and the run completes. Runs
benchmarks/malformed_report.py (which writes the Markdown table) at tiny size and checks each row.

The unreadable file is really unreadable: mode 000, and the run drops CAP_DAC_OVERRIDE, so root too
gets EACCES (tests/faultkit.py: no_dac_override). The FIFO, symlink loops and the mode-000 folder are
real filesystem objects too."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_report_module():
    spec = importlib.util.spec_from_file_location("malformed_report", ROOT / "benchmarks" / "malformed_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("malformed_out")
    mod = _load_report_module()
    rc = mod.main(["--tiny", "--out", str(out)])
    doc = json.loads((out / "malformed_table.json").read_text())
    return rc, doc, (out / "malformed_table.md").read_text()


def test_run_completes_and_every_case_is_as_expected(report):
    rc, doc, _ = report
    assert doc["exit_code"] == 0 and doc["rerun_exit_code"] == 0
    assert doc["verify"] == []
    bad = [(c["case"], c["outcome"], c["reason"]) for c in doc["cases"] if not c["ok"]]
    assert bad == []
    assert rc == 0


def test_every_skip_has_a_reason_in_the_table_and_the_report(report):
    _, doc, _ = report
    skipped = [c for c in doc["cases"] if c["expected"] == "skipped"]
    assert len(skipped) >= 14
    for c in skipped:
        assert c["outcome"] == "skipped" and c["reason"].strip() and "\n" not in c["reason"], c
        assert c["in_report"], c
    assert doc["errors_recorded"] == len(skipped)


def test_specific_reasons(report):
    _, doc, _ = report
    by = {c["name"]: c for c in doc["cases"]}
    assert "empty" in by["zero_bytes.jpg"]["reason"]
    assert "truncated" in by["truncated.jpg"]["reason"] and "truncated" in by["truncated.png"]["reason"]
    assert "bomb" in by["bomb_100000x100000.png"]["reason"]
    assert "Permission denied" in by["unreadable.jpg"]["reason"]
    assert by["fifo.jpg"]["reason"] == "not a regular file"
    assert by["loop"]["reason"] == by["self_loop.jpg"]["reason"] == "symlink loop"
    assert by["dangling.jpg"]["reason"] == "broken symlink"
    assert by["locked_dir"]["reason"] == "permission denied"
    assert by["folder.jpg"]["outcome"] == "folder" and by["folder.jpg/inside.jpg"]["outcome"] == "indexed"


def test_indexed_cases_have_the_displayed_size(report):
    _, doc, _ = report
    by = {c["name"]: c for c in doc["cases"]}
    assert by["exif_rotated6.jpg"]["detail"].startswith("32x64")  # EXIF rotation applied
    assert by["exif_garbage_orientation.jpg"]["detail"].startswith("64x48")  # garbage ignored
    assert by["one_pixel.png"]["detail"].startswith("1x1")
    assert by["animated.gif"]["detail"].startswith("32x32")
    assert "20 captions" in by["huge_sidecar.jpg"]["detail"]  # bounded, not 100k captions
    assert "caf\ufffd au lait" in by["latin1_sidecar.jpg"]["detail"]
    assert by["caf\\xe9-latin1.jpg"]["outcome"] == "indexed"


def test_second_run_changes_nothing(report):
    _, doc, _ = report
    assert " 0 encoded" in doc["rerun_report"] and " 0 removed" in doc["rerun_report"]


def test_markdown_table_has_a_row_per_case(report):
    _, doc, md = report
    assert md.startswith("# Malformed and odd files")
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) == len(doc["cases"])
    assert "**no**" not in md
