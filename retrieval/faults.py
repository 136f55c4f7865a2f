"""Test-only fault injection: stop the process at a named point of the write path.

The write path calls ``checkpoint("name")`` at its phase boundaries. Without the environment variable
``RETRIEVAL_FAULT`` (the normal case) ``checkpoint`` is a function that returns at once.

``RETRIEVAL_FAULT`` holds comma-separated rules ``NAME:N[:ACTION]``: at the N-th time checkpoint NAME
is reached, do ACTION (default ``kill``):

- ``kill``: SIGKILL this process (no cleanup at all: what a crash, an OOM kill or a power cut leaves);
- ``int``: send SIGINT to this process (a Ctrl-C) and carry on;
- ``stop``: SIGSTOP this process (a test resumes it with SIGCONT), to hold the writer lock mid-run;
- ``sleep=SECONDS``: sleep at the N-th and every later hit (slows a run down for timing tests);
- ``exit=MARKER``: ``os._exit(1)`` at the N-th hit unless the file MARKER exists, which it creates first:
  one death across all the processes that share the rule (a Ray actor that is restarted re-reads it).

``RETRIEVAL_FAULT_TRACE=FILE`` appends the name of every checkpoint reached to FILE, one per line, so
a test that kills at a random time can tell which phase the kill landed in.

Checkpoints in the code base:
    decode          index_data/pipeline.py           a decoded image reached the indexer (before batching)
    plan            index_data/pipeline.py           the plan's moves, duplicates and deletions written, before COMMIT
    encode          index_data/pipeline.py           a batch was encoded, before its SQLite transaction
    sqlite_commit   retrieval/store/db.py            every Store.transaction(), after its writes, before COMMIT
    migrate         retrieval/store/migrations.py    a schema step's writes done, before its COMMIT
    faiss_write     retrieval/store/vectors.py       VectorIndex.save: faiss data in the temp file, no trailer yet
    publish         retrieval/store/index.py         new generation's files renamed into place, manifest not switched
                    retrieval/store/pg/index.py      a collection's vectors and counts written, before COMMIT
    switch          retrieval/store/switch.py        a finished rebuild's files copied into the index, not switched in
                    index_data/pg_rebuild.py         a finished staging collection checked, schemas not swapped
    ray_encode      index_data/ray_executor.py       an encode actor made a batch's vectors, before returning them
    onnx_export     retrieval/models/onnx_export.py  an export complete in its temp directory, not renamed yet
"""

from __future__ import annotations

import os
import signal
import time

ENV = "RETRIEVAL_FAULT"
ENV_TRACE = "RETRIEVAL_FAULT_TRACE"

_rules: dict[str, list[tuple[int, str]]] = {}
_hits: dict[str, int] = {}
_trace_fd: int | None = None
_on = False


def checkpoint(name: str) -> None:
    """A named point of the write path; does nothing unless RETRIEVAL_FAULT(_TRACE) is set."""
    if _on:
        _hit(name)


def _hit(name: str) -> None:
    n = _hits.get(name, 0) + 1
    _hits[name] = n
    if _trace_fd is not None:
        os.write(_trace_fd, f"{name} {n}\n".encode())
    for at, action in _rules.get(name, ()):
        if action.startswith("sleep="):
            if n >= at:
                time.sleep(float(action[6:]))
        elif action.startswith("exit="):
            if n == at:
                _exit_once(action[5:])
        elif n == at:
            sig = {"kill": signal.SIGKILL, "int": signal.SIGINT, "stop": signal.SIGSTOP}[action]
            os.kill(os.getpid(), sig)


def _exit_once(marker: str) -> None:
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return
    os._exit(1)


def configure(spec: str | None = None, trace: str | None = None) -> None:
    """(Re)read the rules, from the arguments or else the environment. Called once at import."""
    global _on, _trace_fd
    spec = os.environ.get(ENV, "") if spec is None else spec
    trace = os.environ.get(ENV_TRACE) if trace is None else trace
    _rules.clear()
    _hits.clear()
    for rule in filter(None, (r.strip() for r in spec.split(","))):
        parts = rule.split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit():
            raise ValueError(f"{ENV}: bad rule {rule!r}; expected NAME:N[:kill|int|stop|sleep=SECONDS|exit=MARKER]")
        action = parts[2] if len(parts) == 3 else "kill"
        if action not in ("kill", "int", "stop") and not action.startswith(("sleep=", "exit=")):
            raise ValueError(f"{ENV}: unknown action {action!r} in {rule!r}")
        _rules.setdefault(parts[0], []).append((int(parts[1]), action))
    if _trace_fd is not None:
        os.close(_trace_fd)
        _trace_fd = None
    if trace:
        _trace_fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _on = bool(_rules) or _trace_fd is not None


configure()
