"""The CLI contract: names, output formats, exit codes, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY, run_python, write_photos

from retrieval.cli import main
from retrieval.cli.group import COMMAND_MODULES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    photos = write_photos(root / "photos", 8)
    r = CliRunner().invoke(
        main,
        [
            "index",
            str(root / "photos"),
            "--index",
            str(root / "idx"),
            "--model",
            TINY,
            "--workers",
            "0",
            "-q",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    return root, photos


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    listed = set(main.commands)
    assert listed == {"index", "search", "info", "verify", "copy", "duplicates", "benchmark", "serve", "train-fusion"}
    assert listed == set(COMMAND_MODULES)  # every command is reachable through the lazy table
    for cmd in sorted(listed):
        assert f"  {cmd} " in r.output, cmd


def test_a_command_loads_only_its_own_module():
    code = (
        "import sys\n"
        "from retrieval.cli import main\n"
        "try:\n    main(['search', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('retrieval.cli.')))\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "['retrieval.cli.group', 'retrieval.cli.searching']"


def _console_script(args):
    """`retrieval ARGS` as the console script runs it (retrieval.cli.run), with an exit handler that reports
    on stderr whether the interpreter's teardown ran."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('teardown ran', file=sys.stderr))\n"
        f"sys.argv = ['retrieval', *{list(map(str, args))!r}]\n"
        "from retrieval.cli import run\n"
        "run()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_a_search_process_skips_the_teardown_and_keeps_its_output_and_exit_code(indexed, tmp_path):
    root, photos = indexed
    idx = str(root / "idx")
    r = _console_script(["search", "a photo", "--index", idx, "-k", "8", "--json"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["rank"] for x in lines] == list(range(1, 9))  # all of it, flushed before the exit
    assert "teardown ran" not in r.stderr
    r = _console_script(["search", "a photo", "--index", idx, "--glob", "*.none"])
    assert r.returncode == 1 and r.stdout == "" and "teardown ran" not in r.stderr
    # errors and other commands end as usual
    r = _console_script(["search", "a photo", "--index", str(tmp_path / "none")])
    assert r.returncode == 2 and r.stderr.startswith("error: no index at") and "teardown ran" in r.stderr
    r = _console_script(["info", "--index", idx, "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["images"] == 8 and "teardown ran" in r.stderr


def test_a_search_into_a_closed_pipe_ends_quietly(indexed):
    root, _ = indexed
    cmd = [sys.executable, str(ROOT / "cli.py"), "search", "a photo", "--index", str(root / "idx"), "-k", "8"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()  # like `| head -0`: nobody reads the results
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) in (0, 1) and "Traceback" not in err and "Exception ignored" not in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full (every write fails: disk full) is Linux's")
@pytest.mark.parametrize("k", ["2", "8"])
def test_results_that_cannot_be_written_are_one_line_and_exit_2(indexed, k):
    root, _ = indexed
    cmd = [sys.executable, str(ROOT / "cli.py"), "search", "a photo", "--index", str(root / "idx"), "-k", k]
    # -k 2 fits the output buffer (the failure comes at the final flush); --json -k 8 writes through it
    with open("/dev/full", "w") as full:
        r = subprocess.run(cmd + (["--json"] if k == "8" else []), stdout=full, stderr=subprocess.PIPE, cwd=ROOT)
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines() == ["error: cannot write the results: No space left on device"]


def test_info_json(indexed):
    root, _ = indexed
    r = run("info", "--index", str(root / "idx"), "--json")
    d = json.loads(r.output)
    assert d["images"] == 8 and d["model"] == TINY and d["dim"] == 64 and d["index_type"] == "flat"
    assert {"captions", "errors"} <= set(d)


def test_search_formats(indexed):
    root, photos = indexed
    r = run("search", "--image", str(photos[0]), "--index", str(root / "idx"), "-k", "3", "--json")
    assert r.exit_code == 0
    lines = [json.loads(line) for line in r.output.strip().splitlines()]
    assert len(lines) == 3 and lines[0]["path"] == str(photos[0]) and lines[0]["rank"] == 1
    assert {"rank", "score", "path"} <= set(lines[0])
    r = run("search", "a photo", "--index", str(root / "idx"), "-k", "4", "--paths")
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 4
    assert all(os.path.exists(p) for p in r.output.strip().splitlines())
    r = run("search", "a photo", "--index", str(root / "idx"), "-k", "2")
    assert r.exit_code == 0 and "rank" in r.output and "score" in r.output


def test_search_exit_codes(indexed, tmp_path):
    root, _ = indexed
    r = run("search", "x", "--index", str(root / "idx"), "--glob", "*.none", "--json")
    assert r.exit_code == 1 and r.output == ""
    r = run("search", "x", "--index", str(tmp_path / "nothing-here"))
    assert r.exit_code == 2 and r.output.startswith("error: no index at")
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    r = run("search", "--image", str(bad), "--index", str(root / "idx"))
    assert r.exit_code == 2 and "not an image" in r.output and "Traceback" not in r.output


def test_index_mismatch_is_one_line(indexed):
    root, _ = indexed
    r = run("index", str(root / "photos"), "--index", str(root / "idx"), "--model", "ViT-B-32:none", "-q")
    assert r.exit_code == 2 and "--rebuild" in r.output and "Traceback" not in r.output


def test_verify_ok(indexed):
    root, _ = indexed
    r = run("verify", "--index", str(root / "idx"))
    assert r.exit_code == 0 and r.output.strip() == "ok"


def test_offline_weights_error_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    write_photos(tmp_path / "p", 1)
    r = run(
        "index", str(tmp_path / "p"), "--index", str(tmp_path / "idx"), "--model", "ViT-B-32:laion2b_s34b_b79k", "-q"
    )
    assert r.exit_code == 2
    assert "--model starter" in r.output and "Traceback" not in r.output


def test_python_cli_and_console_script_subprocess(indexed):
    root, photos = indexed
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "search",
            "--image",
            str(photos[1]),
            "--index",
            str(root / "idx"),
            "-k",
            "1",
            "--paths",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(photos[1])
    exe = Path(sys.executable).parent / "retrieval"  # the console script `make test` installs
    out = subprocess.run(
        [str(exe), "info", "--index", str(root / "idx"), "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0 and json.loads(out.stdout)["images"] == 8


def test_conflicting_search_options_are_one_line_errors(indexed):
    root, photos = indexed
    idx = str(root / "idx")
    for args, fragment in (
        (("search", "x", "--json", "--paths"), "cannot be combined"),
        (("search", "x", "--weight", "0.3"), "only applies to a composite query"),
        (("search", "--image", str(photos[0]), "--weight", "0.3"), "only applies to a composite query"),
    ):
        r = run(*args, "--index", idx)
        assert r.exit_code == 2 and fragment in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert run("search", "x", "--image", str(photos[0]), "--weight", "0.3", "--index", idx).exit_code == 0


def test_searching_an_index_with_no_images_is_one_line(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    r = run(
        "index",
        str(tmp_path / "p"),
        "--index",
        str(tmp_path / "idx"),
        "--model",
        TINY,
        "--workers",
        "0",
        "-q",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    r = run("search", "anything", "--index", str(tmp_path / "idx"))
    assert r.exit_code == 2 and "has no images to search" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_weights_replaced_after_indexing_are_refused_at_query_time(tmp_path):
    """The index records the sha256 of its weights. If the file at that path is later replaced, a query that
    must load the model (no ONNX export of the index's model in the cache) stops with a one-line mismatch;
    queries on the index's own export, which still matches the stored vectors, keep answering."""
    import torch
    from safetensors.torch import save_file

    from retrieval.models.registry import load_encoder

    model = load_encoder(TINY, device="cpu").model
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(weights))
    photos = write_photos(tmp_path / "p", 3)
    r = run(
        "index",
        str(tmp_path / "p"),
        "--index",
        str(tmp_path / "idx"),
        "--model",
        f"tiny-clip:{weights}",
        "--workers",
        "0",
        "-q",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(weights))
    assert run("search", "--image", str(photos[0]), "--index", str(tmp_path / "idx"), "--paths").exit_code == 0
    assert run("search", "a photo", "--index", str(tmp_path / "idx"), "--paths").exit_code == 0
    os.environ["RETRIEVAL_CACHE_DIR"], cache = str(tmp_path / "empty-cache"), os.environ["RETRIEVAL_CACHE_DIR"]
    try:
        r = run("search", "--image", str(photos[0]), "--index", str(tmp_path / "idx"), "--device", "cpu")
    finally:
        os.environ["RETRIEVAL_CACHE_DIR"] = cache
    assert r.exit_code == 2 and "model mismatch" in r.output, r.output
    assert "Traceback" not in r.output


def test_search_probes_reaches_the_vector_index(indexed, monkeypatch):
    from retrieval.store.vectors import VectorIndex

    root, photos = indexed
    seen = []
    real = VectorIndex.search

    def spy(self, queries, k, allowed_ids=None, probes=None):
        seen.append(probes)
        return real(self, queries, k, allowed_ids=allowed_ids, probes=probes)

    monkeypatch.setattr(VectorIndex, "search", spy)
    args = ["search", "--image", str(photos[0]), "--index", str(root / "idx"), "-k", "3", "--json"]
    plain = run(*args)
    probed = run(*args, "--probes", "64")
    assert plain.exit_code == probed.exit_code == 0
    assert plain.output == probed.output  # flat is exact: the effort changes nothing
    assert seen == [None, 64]
    bad = run(*args, "--probes", "0")
    assert bad.exit_code == 2 and "--probes" in bad.output and "Traceback" not in bad.output
    info = json.loads(run("info", "--index", str(root / "idx"), "--json").output)
    assert info["index_params"] == {}  # flat has no knobs; IVF shows nlist/nprobe here
