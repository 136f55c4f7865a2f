"""Helpers for the fault suites (kill, concurrency, verify, disk-full): run the CLI in child processes,
snapshot an index, and check the invariants every interrupted run must leave behind.

Child processes. `python cli.py index ...` pays ~4-7 s of torch/open_clip import on the 2-core machine,
so a kill suite of 20+ runs cannot afford one interpreter per run. `Zygote` starts ONE interpreter
(`python tests/faultkit.py zygote`) that imports cli, torch, open_clip and faiss and runs no torch op;
each run is then a fresh `os.fork()` of it that calls `cli.main(argv)` exactly as `python cli.py argv`
would, in its own session (so its decode workers share its process group), with its own environment
(RETRIEVAL_FAULT is re-read) and its output in files. A forked run is a separate OS process: SIGKILL,
SIGINT and SIGSTOP reach it exactly as they reach `python cli.py`. `start_cli` runs the real
`python cli.py` for the cases that must not depend on the zygote.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny-clip:none"

# the environment of every child: offline, one OpenMP thread (2 threads on a busy 2-core box spin
# against each other and make a tiny-model run 3x slower)
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_FAULT")}
    env.update(CHILD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


# ----------------------------------------------------------------------------------------------- runs


class Run:
    """One child process running the CLI. `rc` follows subprocess: -N when killed by signal N."""

    def __init__(self, pid: int, out: Path, err: Path, waiter):
        self.pid = pid
        self.out = out
        self.err = err
        self._waiter = waiter
        self.rc: int | None = None
        self.t0 = time.monotonic()
        self.seconds: float | None = None

    def wait(self, timeout: float = 120.0) -> int:
        if self.rc is None:
            self.rc = self._waiter(timeout)
            self.seconds = time.monotonic() - self.t0
            reap_group(self.pid)
        return self.rc

    def signal(self, sig: int) -> bool:
        """Send `sig` to the run's main process if it is still running."""
        if self.rc is not None:
            return False
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the run's whole process group, as a terminal's Ctrl-C does."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def state(self) -> str:
        """Linux process state letter (R, S, T for stopped, Z), or '' once gone."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return ""


ORPHANS_REAPED: list[int] = []  # process groups in which something outlived its parent


def reap_group(pgid: int, grace: float = 3.0) -> bool:
    """Wait for every process of group `pgid` (decode workers of a killed run) to go; SIGKILL what is
    left after `grace` seconds and remember it. True if the group emptied by itself."""
    deadline = time.monotonic() + grace
    while True:
        if not _live_members(pgid):
            return True
        if time.monotonic() > deadline:
            ORPHANS_REAPED.append(pgid)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return False
        time.sleep(0.02)


def _live_members(pgid: int) -> list[int]:
    """Processes of group pgid that are not zombies (a dead worker reparented to init stays a zombie
    until init reaps it, which here takes a second or two)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            live.append(int(entry))
    return live


def start_cli(argv: list[str], workdir: Path, env: dict | None = None) -> Run:
    """The real thing: `python cli.py ARGV` in a new session."""
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob("run*.out")))
    out, err = workdir / f"run{n}.out", workdir / f"run{n}.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), *argv],
            stdin=subprocess.DEVNULL,
            stdout=fo,
            stderr=fe,
            env=env or child_env(),
            cwd=ROOT,
            start_new_session=True,
        )

    def waiter(timeout):
        return proc.wait(timeout)

    return Run(proc.pid, out, err, waiter)


class Zygote:
    """A pre-imported interpreter that forks one child per CLI run (see the module docstring)."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
            cwd=ROOT,
            bufsize=0,
        )
        self._buf = b""
        hello = self._line(180.0)
        if not hello.get("ready"):
            raise RuntimeError(f"zygote failed to start: {hello}")
        self.threads_at_fork = hello.get("threads")

    def _line(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("zygote did not answer")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"zygote exited (rc {self.proc.wait()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, argv: list[str], workdir: Path, env: dict | None = None, patch: dict | None = None) -> Run:
        """Fork a child running `cli.main(argv)`. `env` replaces the environment (default child_env());
        `patch` sets module attributes in the child first ({"index_data.pipeline.CHECKPOINT_SECONDS": 0})."""
        workdir.mkdir(parents=True, exist_ok=True)
        n = len(list(workdir.glob("run*.out")))
        out, err = workdir / f"run{n}.out", workdir / f"run{n}.err"
        req = {
            "argv": argv,
            "env": env or child_env(),
            "stdout": str(out),
            "stderr": str(err),
            "cwd": str(ROOT),
            "patch": patch or {},
        }
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        pid = self._line(30.0)["pid"]
        return Run(pid, out, err, lambda timeout: self._line(timeout)["rc"])

    def start_detached(self, argv: list[str], workdir: Path, env: dict | None = None) -> Run:
        """Like start, but the zygote takes the next request at once: several runs at the same time. The run
        is a grandchild of the zygote; its exit code comes back in a file (-9 when it died without writing one)."""
        workdir.mkdir(parents=True, exist_ok=True)
        n = len(list(workdir.glob("run*.out")))
        out, err, base = workdir / f"run{n}.out", workdir / f"run{n}.err", workdir / f"run{n}"
        req = {"argv": argv, "env": env or child_env(), "stdout": str(out), "stderr": str(err), "cwd": str(ROOT)}
        req.update(patch={}, detach=str(base))
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        assert self._line(30.0).get("detached")
        pid_file, rc_file = Path(f"{base}.pid"), Path(f"{base}.rc")
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        pid = int(pid_file.read_text())

        def waiter(timeout):
            end = time.monotonic() + timeout
            while not rc_file.exists():
                if not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    if rc_file.exists():
                        break
                    return -signal.SIGKILL
                if time.monotonic() > end:
                    raise TimeoutError(f"run {pid} did not finish in {timeout} s")
                time.sleep(0.02)
            return int(rc_file.read_text())

        return Run(pid, out, err, waiter)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_ZYGOTE: Zygote | None = None


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def zygote() -> Zygote:
    """The one zygote of this test process (started on first use, stopped at exit)."""
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.proc.poll() is not None:
        _ZYGOTE = Zygote()
        atexit.register(_ZYGOTE.close)
    return _ZYGOTE


def _zygote_main() -> None:  # runs in the zygote process
    sys.path.insert(0, str(ROOT))
    import importlib
    import traceback

    import faiss  # noqa: F401
    import open_clip  # noqa: F401
    import torch  # noqa: F401

    import index_data.pipeline  # noqa: F401
    import retrieval.cli
    import retrieval.cli.indexing  # noqa: F401 - the commands, loaded once before the forks
    import retrieval.cli.manage  # noqa: F401
    import retrieval.cli.searching  # noqa: F401
    import retrieval.models.openclip  # noqa: F401
    import retrieval.models.registry  # noqa: F401
    import retrieval.query.searcher  # noqa: F401
    from retrieval import faults

    out = sys.stdout.buffer
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
    out.write((json.dumps({"ready": True, "threads": threads}) + "\n").encode())
    out.flush()
    for line in sys.stdin.buffer:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            if req.get("detach") and os.fork() != 0:
                os._exit(0)  # detached: the run is a grandchild, so the zygote can take the next request at once
            code = 1
            try:
                if req.get("detach"):
                    _write_atomic(req["detach"] + ".pid", str(os.getpid()))
                os.setsid()
                for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                os.environ.clear()
                os.environ.update(req["env"])
                os.chdir(req["cwd"])
                faults.configure()
                for dotted, value in req["patch"].items():
                    mod, attr = dotted.rsplit(".", 1)
                    setattr(importlib.import_module(mod), attr, value)
                sys.argv = [str(ROOT / "cli.py"), *req["argv"]]
                retrieval.cli.main(args=req["argv"], prog_name="cli.py")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    if req.get("detach"):
                        _write_atomic(req["detach"] + ".rc", str(code))
                    os._exit(code)
        if req.get("detach"):
            os.waitpid(pid, 0)  # the middle process, gone at once
            out.write((json.dumps({"detached": True}) + "\n").encode())
            out.flush()
            continue
        out.write((json.dumps({"pid": pid}) + "\n").encode())
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write((json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n").encode())
        out.flush()


def _reader_main(index_dir: str, out_path: str, stop_path: str, seed: str) -> None:  # a reader process
    """Search in a loop until stop_path exists; write one JSON line per distinct vector set seen and a
    summary. For every search: the generation and ids of the FAISS file it used, and whether every id
    it returned has a row in SQLite. Reopens the index every 25 searches (the open path races too)."""
    sys.path.insert(0, str(ROOT))
    import hashlib
    import traceback

    import numpy as np

    from retrieval.query.searcher import Searcher

    rng = np.random.default_rng(int(seed))
    out = open(out_path, "w")
    seen: dict[tuple, int] = {}
    n = errors = missing = reopen = 0
    first_error = None
    s = Searcher.open(index_dir, device="cpu")
    out.write(json.dumps({"started": True}) + "\n")
    out.flush()
    t0 = time.monotonic()
    while not os.path.exists(stop_path):
        try:
            if n and n % 25 == 0:
                s.close()
                s = Searcher.open(index_dir, device="cpu")
                reopen += 1
            with s.index.pinned():  # as Searcher.search does: the dimension and vectors of one generation
                q = rng.standard_normal(s.index.dim).astype(np.float32)
                q /= np.linalg.norm(q)
                vi = s.index.vectors("images")
                gen = next(g for (kind, g) in s.index._vectors if kind == "images")
                _, ids = vi.search(q[None], 5)
                got = [int(i) for i in ids[0] if i >= 0]
                rows = s.index.store.images_by_ids(got)
                missing += len(got) - len(rows)
                res = s.search_vector(q, k=5)  # the public path: must not fail either
                if len(res) != min(5, vi.ntotal):
                    missing += 1
                key = (gen, int(vi.ntotal))
                if key not in seen:
                    digest = hashlib.sha256(np.sort(vi.ids()).astype("<i8").tobytes()).hexdigest()
                    out.write(
                        json.dumps({"gen": gen, "ntotal": int(vi.ntotal), "digest": digest, "dim": int(vi.dim)}) + "\n"
                    )
                    out.flush()
                    seen[key] = 0
                seen[key] += 1
            n += 1
        except Exception:
            errors += 1
            first_error = first_error or traceback.format_exc()
    out.write(
        json.dumps(
            {
                "searches": n,
                "errors": errors,
                "first_error": first_error,
                "missing_rows": missing,
                "reopens": reopen,
                "seconds": time.monotonic() - t0,
                "per_generation": {f"{g}:{nt}": c for (g, nt), c in seen.items()},
            }
        )
        + "\n"
    )
    out.close()


def start_reader(index_dir, workdir: Path, seed: int = 0) -> tuple[subprocess.Popen, Path, Path]:
    """A reader process (no torch: it searches with random query vectors). Returns (proc, out, stop)."""
    return _start_reader_process("reader", str(index_dir), workdir, seed, timeout=120)


def _start_reader_process(verb: str, where: str, workdir: Path, seed: int, timeout: float):
    """`python faultkit.py VERB WHERE OUT STOP SEED`, returned once it has written its start line."""
    workdir.mkdir(parents=True, exist_ok=True)
    out, stop = workdir / f"{verb}.jsonl", workdir / f"{verb}.stop"
    proc = subprocess.Popen(
        [sys.executable, __file__, verb, where, str(out), str(stop), str(seed)],
        env=child_env(),
        cwd=ROOT,
        stderr=open(workdir / f"{verb}.err", "wb"),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().startswith('{"started"'):
            return proc, out, stop
        time.sleep(0.01)
    raise RuntimeError(f"reader did not start: {(workdir / f'{verb}.err').read_text()[-2000:]}")


def _pg_reader_main(url: str, out_path: str, stop_path: str, seed: str) -> None:  # a reader of a collection
    """Until stop_path exists, alternately: read the collection's counts in one REPEATABLE READ snapshot, and
    search it through Searcher with a random query vector. Writes a summary line. A violation is any of:
    the published vector count (manifest) differs from the vector rows in the same snapshot; an image row
    without its raw embedding; two raw embeddings of one content; images, vectors or the generation going
    down between snapshots; a search hit that is not an image row with a vector; fewer hits than the
    vectors published before the search (every query is exact: the writers use --index-type flat)."""
    sys.path.insert(0, str(ROOT))
    import traceback

    import numpy as np
    import psycopg

    from retrieval.errors import IndexNotFoundError
    from retrieval.query.searcher import Searcher
    from retrieval.store.pg.location import parse_location

    loc = parse_location(url)
    c = loc.collection
    rng = np.random.default_rng(int(seed))
    conn = psycopg.connect(loc.dsn, autocommit=True)
    out = open(out_path, "w")
    out.write(json.dumps({"started": True}) + "\n")
    out.flush()
    searcher = None
    last = (0, 0, 0)
    states: set = set()
    snapshots = searches = errors = 0
    violations: list[str] = []
    first_error = None
    k = 5
    while not os.path.exists(stop_path):
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                ready = conn.execute(
                    "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'image_vectors'", [c]
                ).fetchone()
                row = None
                if ready:
                    row = conn.execute(
                        f"SELECT (SELECT count(*) FROM {c}.images), (SELECT count(*) FROM {c}.image_vectors), "
                        f"(SELECT value FROM {c}.manifest WHERE key = 'vectors_images'), "
                        f"(SELECT value FROM {c}.manifest WHERE key = 'generation'), "
                        f"(SELECT count(*) FROM {c}.images i WHERE NOT EXISTS (SELECT 1 FROM {c}.embeddings e "
                        f"WHERE e.kind = 'image' AND e.key = i.hash)), "
                        f"(SELECT count(*) - count(DISTINCT (kind, key)) FROM {c}.embeddings)"
                    ).fetchone()
            if row is None:
                time.sleep(0.02)
                continue
            images, vectors, published, gen, no_embedding, doubled = row
            published = int(json.loads(published)) if published else 0
            gen = int(json.loads(gen)) if gen else 0
            snapshots += 1
            states.add((images, vectors, gen))
            if published != vectors:
                violations.append(f"manifest says {published} vectors, the same snapshot has {vectors}")
            if no_embedding or doubled:
                violations.append(f"{no_embedding} images without raw embedding, {doubled} doubled embeddings")
            now = (images, vectors, gen)
            if any(a < b for a, b in zip(now, last)):
                violations.append(f"(images, vectors, generation) went from {last} to {now}")
            last = tuple(max(a, b) for a, b in zip(now, last))
            if searcher is None:
                try:
                    searcher = Searcher.open(url, device="cpu")
                except IndexNotFoundError:
                    continue
            q = rng.standard_normal(searcher.index.dim).astype(np.float32)
            q /= np.linalg.norm(q)
            hits = searcher.search_vector(q, k=k, dedupe=False)
            searches += 1
            ids = [h.id for h in hits]
            ok = conn.execute(
                f"SELECT count(*) FROM {c}.images i JOIN {c}.image_vectors v ON v.id = i.id WHERE i.id = ANY(%s)",
                [ids],
            ).fetchone()[0]
            if ok != len(set(ids)) or len(set(ids)) != len(ids):
                violations.append(f"hits {ids}: {ok} of them are image rows with a vector")
            if len(hits) < min(k, published):
                violations.append(f"{len(hits)} hits after {published} vectors were published")
        except Exception:
            errors += 1
            first_error = first_error or traceback.format_exc()
    summary = {
        "snapshots": snapshots,
        "searches": searches,
        "states": len(states),
        "last": last,
        "errors": errors,
        "first_error": first_error,
        "violations": violations[:10],
    }
    out.write(json.dumps(summary) + "\n")
    out.close()


def start_pg_reader(url: str, workdir: Path, seed: int = 0) -> tuple[subprocess.Popen, Path, Path]:
    """A reader process of a collection (see _pg_reader_main). Returns (proc, out, stop)."""
    return _start_reader_process("pg_reader", url, workdir, seed, timeout=60)


def index_argv(paths, index_dir, *extra, batch_size: int = 8, workers: int = 1, model: str | None = TINY) -> list[str]:
    argv = [
        "index",
        *map(str, paths),
        "--index",
        str(index_dir),
        "--batch-size",
        str(batch_size),
        "--workers",
        str(workers),
        "--device",
        "cpu",
        "-q",
    ]
    if model:
        argv += ["--model", model]
    return argv + list(extra)


# ------------------------------------------------------------------------------------- capabilities

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


@contextmanager
def no_dac_override():
    """Make permission bits bind this thread even as root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    from the calling thread's effective set for the duration (they stay permitted, and are restored).
    Processes forked meanwhile inherit the reduced set. Without root nothing needs dropping. Linux."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    hdr = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    saved = (Data * 2)()
    if libc.capget(ctypes.byref(hdr), saved) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    reduced = (Data * 2)()
    ctypes.memmove(reduced, saved, ctypes.sizeof(saved))
    reduced[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
    if libc.capset(ctypes.byref(hdr), reduced) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    try:
        yield
    finally:
        hdr = Header(0x20080522, 0)
        libc.capset(ctypes.byref(hdr), saved)


# ------------------------------------------------------------------------------------------ snapshots

PENDING_PATTERNS = (
    "rows have no vector",
    "orphan vectors",
    "no vector files were ever written",
    "have no new vector yet",
)


def snapshot(index_dir) -> dict:
    """What an index holds, in run-independent terms (paths and hashes, not row ids), plus the checks
    that need no encoder. Raises if the index cannot be opened."""
    from retrieval.store.index import Index
    from retrieval.store.rows import path_from_db

    with Index.open(index_dir) as idx:
        db = idx.store.db
        images = {path_from_db(raw): h for raw, h in db.execute("SELECT path_raw, hash FROM images")}
        n_rows = db.execute("SELECT COUNT(*), COUNT(DISTINCT path_raw) FROM images").fetchone()
        captions = sorted(
            (path_from_db(raw) if raw is not None else None, text, src)
            for raw, text, src in db.execute(
                "SELECT i.path_raw, c.text, c.source FROM captions c LEFT JOIN images i ON i.id = c.image_id"
            )
        )
        dangling = db.execute(
            "SELECT COUNT(*) FROM captions c WHERE c.image_id IS NOT NULL AND c.image_id NOT IN (SELECT id FROM images)"
        ).fetchone()[0]
        emb = dict(db.execute("SELECT kind, COUNT(*) FROM embeddings GROUP BY kind").fetchall())
        distinct = {
            "image": db.execute("SELECT COUNT(DISTINCT hash) FROM images").fetchone()[0],
            "text": db.execute("SELECT COUNT(DISTINCT text_hash) FROM captions").fetchone()[0],
        }
        errors = sorted(path_from_db(raw) for (raw,) in db.execute("SELECT path_raw FROM errors"))
        quick = db.execute("PRAGMA quick_check").fetchone()[0]
        gen = idx.generation
        problems = idx.verify()
    files = sorted(p.name for p in Path(index_dir).iterdir())
    return {
        "images": images,
        "rows": n_rows[0],
        "distinct_paths": n_rows[1],
        "captions": captions,
        "dangling_captions": dangling,
        "embeddings": emb,
        "distinct": distinct,
        "errors": errors,
        "quick_check": quick,
        "generation": gen,
        "problems": problems,
        "files": files,
    }


def invariant_failures(snap: dict, reference: dict) -> list[str]:
    """Everything that must hold after a run has completed, compared with an uninterrupted run."""
    bad = []
    if snap["problems"]:
        bad.append(f"verify: {snap['problems']}")
    if snap["quick_check"] != "ok":
        bad.append(f"sqlite quick_check: {snap['quick_check']}")
    if snap["rows"] != snap["distinct_paths"]:
        bad.append(f"{snap['rows']} image rows for {snap['distinct_paths']} paths (a file indexed twice)")
    if snap["images"] != reference["images"]:
        missing = sorted(set(reference["images"]) - set(snap["images"]))
        extra = sorted(set(snap["images"]) - set(reference["images"]))
        wrong = sorted(
            p for p in set(snap["images"]) & set(reference["images"]) if snap["images"][p] != reference["images"][p]
        )
        bad.append(f"images differ: missing {missing[:3]}, extra {extra[:3]}, wrong hash {wrong[:3]}")
    if snap["captions"] != reference["captions"]:
        bad.append(f"captions differ: {len(snap['captions'])} vs {len(reference['captions'])}")
    if snap["dangling_captions"]:
        bad.append(f"{snap['dangling_captions']} captions point at no image")
    if snap["errors"] != reference["errors"]:
        bad.append(f"errors differ: {snap['errors']} vs {reference['errors']}")
    if (
        snap["embeddings"].get("image", 0) != snap["distinct"]["image"]
        or snap["embeddings"].get("text", 0) != snap["distinct"]["text"]
    ):
        bad.append(f"embeddings {snap['embeddings']} != distinct contents {snap['distinct']}")
    stale = [f for f in snap["files"] if f.endswith(".tmp")]
    if stale:
        bad.append(f"stale temp files: {stale}")
    gens = sorted({int(f.split(".")[1][1:]) for f in snap["files"] if f.endswith(".faiss") and not f.startswith(".")})
    if gens and (max(gens) != snap["generation"] or len(gens) > 2):
        bad.append(f"vector files of generations {gens} with manifest generation {snap['generation']}")
    return bad


_ENCODERS: dict = {}


def self_query_failures(index_dir, paths, hashes) -> list[str]:
    """Search by each image: the top result must be that image (or a byte-identical copy). The query is
    embedded by one encoder of the index's model kept for the whole test session (what
    Searcher.search(image=...) does, minus loading the model again for every check)."""
    from retrieval.models.registry import load_encoder
    from retrieval.query.searcher import Searcher

    bad = []
    with Searcher.open(index_dir, device="cpu") as s:
        spec = s.index.identity.spec
        if spec not in _ENCODERS:
            _ENCODERS[spec] = load_encoder(spec, device="cpu")
        enc = _ENCODERS[spec]
        s.index.check_identity(enc.identity)
        for p in paths:
            res = s.search_vector(enc.encode_images([str(p)])[0], k=3)
            if not res or res[0].hash != hashes[str(p)]:
                bad.append(f"self-query {os.path.basename(str(p))}: got {[r.path for r in res[:1]]}")
    return bad


if __name__ == "__main__" and sys.argv[1:] == ["zygote"]:
    _zygote_main()
elif __name__ == "__main__" and sys.argv[1:2] == ["reader"]:
    _reader_main(*sys.argv[2:])
elif __name__ == "__main__" and sys.argv[1:2] == ["pg_reader"]:
    _pg_reader_main(*sys.argv[2:])
