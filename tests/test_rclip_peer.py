"""The parts of benchmarks/rclip_peer.py that need neither rclip nor the network: reading rclip's printed
results, comparing two top-10 lists, and the install-size walk over RECORD files."""

import importlib.metadata as md
import os
import sys

from benchmarks.rclip_peer import closure_size, compare, parse_engine, parse_rclip


def test_parse_and_compare_results():
    out = 'score\tfilepath\n0.129\t"/p/a b.jpg"\n0.065\t"/p/c.jpg"\n0.065\t"/p/d.jpg"\n'
    rclip = parse_rclip(out)
    assert rclip == [
        {"path": "/p/a b.jpg", "score": 0.129},
        {"path": "/p/c.jpg", "score": 0.065},
        {"path": "/p/d.jpg", "score": 0.065},
    ]
    engine = parse_engine(
        '{"id": 1, "path": "/p/a b.jpg", "score": 0.12863}\n{"id": 3, "path": "/p/d.jpg", "score": 0.0648}\n'
    )
    c = compare(engine, rclip)
    assert c["same_top10_order"] is False
    assert c["overlap"] == 2
    assert abs(c["max_score_diff"] - 0.00037) < 1e-9


def test_closure_size_counts_installed_files():
    got = closure_size(sys.executable, "click")
    d = md.distribution("click")
    own = sum(os.path.getsize(f.locate()) for f in d.files if os.path.isfile(f.locate()))
    assert got["distributions"] >= 1
    assert got["bytes"] >= own > 0
    assert closure_size(sys.executable, "no-such-distribution-xyz") == {"bytes": 0, "distributions": 0}
