"""index_data.scan: what is found, what is skipped, what is reported, and how fast."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
from corpus import LONG_NAME, NON_UTF8_NAME, make_jpeg, make_png, make_text_file

from index_data import scan as scan_mod
from index_data.scan import ScannedFile, ScanProblem, scan
from retrieval.errors import RetrievalError
from retrieval.hashing import hash_file
from retrieval.images import load_image


def names(files, root) -> list[str]:
    return [os.path.relpath(f.path, root) for f in files]


def touch(path, data: bytes = b"x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "photos")
    for rel in [
        "a.jpg",
        "b.JPEG",
        "c.png",
        "d.WebP",
        "e.gif",
        "f.bmp",
        "g.tif",
        "h.TIFF",
        "sub/deep/i.jpg",
        "raw/j.jpg",
        "sub/thumbnails/k.jpg",
        "thumbnails/l.jpg",
    ]:
        touch(os.path.join(root, rel))
    for rel in ["notes.txt", "sub/readme", "m.jpg.bak", "noext"]:
        touch(os.path.join(root, rel))
    touch(os.path.join(root, ".hidden.jpg"))
    touch(os.path.join(root, ".cache/n.jpg"))
    touch(os.path.join(root, "sub/.trash/o.jpg"))
    return root


def test_finds_images_by_extension_any_case(tree):
    files, problems = scan([tree])
    assert problems == []
    assert names(files, tree) == sorted(
        [
            "a.jpg",
            "b.JPEG",
            "c.png",
            "d.WebP",
            "e.gif",
            "f.bmp",
            "g.tif",
            "h.TIFF",
            "sub/deep/i.jpg",
            "raw/j.jpg",
            "sub/thumbnails/k.jpg",
            "thumbnails/l.jpg",
        ]
    )
    f = files[0]
    assert isinstance(f, ScannedFile) and os.path.isabs(f.path) and f.size == 1
    assert f.mtime_ns == os.stat(f.path).st_mtime_ns


def test_hidden_skipped_unless_asked(tree):
    hidden = {".hidden.jpg", ".cache/n.jpg", "sub/.trash/o.jpg"}
    assert not hidden & set(names(scan([tree])[0], tree))
    assert hidden <= set(names(scan([tree], include_hidden=True)[0], tree))
    # a hidden root given explicitly is scanned
    assert names(scan([os.path.join(tree, ".cache")])[0], os.path.join(tree, ".cache")) == ["n.jpg"]


def test_exclude_globs(tree):
    got = set(names(scan([tree], exclude=["*/thumbnails/*", "*.gif", "raw"])[0], tree))
    assert "e.gif" not in got and "raw/j.jpg" not in got
    assert "sub/thumbnails/k.jpg" not in got and "thumbnails/l.jpg" not in got
    assert {"a.jpg", "sub/deep/i.jpg", "c.png"} <= got
    # relative-path patterns
    got = set(names(scan([tree], exclude=["sub/*"])[0], tree))
    assert not any(n.startswith("sub/") for n in got) and "a.jpg" in got


def test_relative_root_gives_absolute_normalised_paths(tree, monkeypatch):
    monkeypatch.chdir(os.path.dirname(tree))
    files, _ = scan(["./photos/sub/../sub"])
    assert files and all(f.path.startswith(os.path.join(tree, "sub") + os.sep) for f in files)


def test_symlink_loop_terminates_and_is_reported_once(tmp_path):
    root = str(tmp_path / "r")
    touch(os.path.join(root, "a/x.jpg"))
    os.symlink("..", os.path.join(root, "a/up"))  # a/up -> r: loops
    os.symlink(root, os.path.join(root, "a/root_abs"))  # absolute link to the root: loops too
    os.symlink("self", os.path.join(root, "self"))  # a link to itself (ELOOP)
    files, problems = scan([root])
    assert names(files, root) == ["a/x.jpg"]
    loops = [p for p in problems if p.reason == "symlink loop"]
    assert sorted(p.path for p in loops) == sorted(os.path.join(root, n) for n in ("a/up", "a/root_abs", "self"))
    assert len(problems) == len(set(problems))


def test_broken_symlink_reported(tmp_path):
    root = str(tmp_path / "r")
    touch(os.path.join(root, "ok.jpg"))
    os.symlink(os.path.join(root, "gone.jpg"), os.path.join(root, "dangling.jpg"))
    files, problems = scan([root])
    assert names(files, root) == ["ok.jpg"]
    assert problems == [ScanProblem(os.path.join(root, "dangling.jpg"), "broken symlink")]


def test_symlinks_followed_deduplicated_real_path_preferred(tmp_path):
    root = str(tmp_path / "r")
    outside = str(tmp_path / "outside")
    touch(os.path.join(root, "real/a.jpg"))
    touch(os.path.join(outside, "b.jpg"))
    os.symlink(os.path.join(root, "real"), os.path.join(root, "alias"))  # sorts before "real"
    os.symlink(os.path.join(root, "real/a.jpg"), os.path.join(root, "a_link.jpg"))
    os.symlink(outside, os.path.join(root, "ext"))
    files, problems = scan([root, os.path.join(root, "real"), os.path.join(root, "real/a.jpg")])
    assert problems == []
    assert names(files, root) == ["ext/b.jpg", "real/a.jpg"]
    files, _ = scan([root], follow_symlinks=False)
    assert names(files, root) == ["real/a.jpg"]


def test_directory_named_like_an_image(tmp_path):
    root = str(tmp_path / "r")
    touch(os.path.join(root, "album.jpg/inner.png"))
    files, problems = scan([root])
    assert names(files, root) == ["album.jpg/inner.png"] and problems == []


def test_fifo_named_like_an_image_is_reported(tmp_path):
    root = str(tmp_path / "r")
    os.makedirs(root)
    os.mkfifo(os.path.join(root, "pipe.jpg"))
    files, problems = scan([root])
    assert files == [] and problems == [ScanProblem(os.path.join(root, "pipe.jpg"), "not a regular file")]


def test_non_utf8_and_long_names_found_and_decodable(tmp_path):
    root = str(tmp_path / "r")
    os.makedirs(root)
    bpath = os.path.join(os.fsencode(root), NON_UTF8_NAME)
    try:
        make_jpeg(bpath, (40, 30))
    except (OSError, UnicodeError):  # a filesystem that refuses non-UTF-8 names (not ext4/overlay/tmpfs)
        pytest.skip("filesystem refuses non-UTF-8 file names")
    assert len(LONG_NAME.encode()) == 250
    make_jpeg(os.path.join(root, LONG_NAME), (40, 30))
    files, problems = scan([root])
    assert problems == [] and len(files) == 2
    odd = [f for f in files if f.path != os.path.join(root, LONG_NAME)][0]
    assert os.fsencode(odd.path) == bpath  # round-trips to the same bytes
    for f in files:
        assert load_image(f.path).size == (40, 30)


def test_permission_denied_directory_reported_not_raised(tmp_path, monkeypatch):
    root = str(tmp_path / "r")
    locked = os.path.join(root, "locked")
    touch(os.path.join(locked, "secret.jpg"))
    touch(os.path.join(root, "ok.jpg"))
    os.chmod(locked, 0)
    try:
        if os.access(locked, os.R_OK):  # running as root: chmod does not deny, so simulate it
            real = os.scandir

            def scandir(path="."):
                if os.fspath(path) == locked:
                    raise PermissionError(13, "Permission denied", path)
                return real(path)

            monkeypatch.setattr(scan_mod.os, "scandir", scandir)
        files, problems = scan([root])
    finally:
        os.chmod(locked, 0o755)
    assert names(files, root) == ["ok.jpg"]
    assert problems == [ScanProblem(locked, "permission denied")]


def test_missing_path_raises_user_error(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(RetrievalError, match="no such file or directory: .*nope"):
        scan([missing])


def test_file_arguments(tmp_path):
    img = touch(str(tmp_path / ".x" / ".hidden.PNG"))
    txt = touch(str(tmp_path / "notes.txt"))
    files, problems = scan([img, txt], exclude=["*.PNG"])
    assert [f.path for f in files] == [img]  # taken as given, even hidden or excluded
    assert problems == [ScanProblem(txt, "not an image file (unsupported extension)")]


def test_deterministic_sorted_output(tree):
    a = scan([tree, os.path.join(tree, "sub")])
    b = scan([os.path.join(tree, "sub"), tree])
    assert a == b
    assert [f.path for f in a[0]] == sorted(f.path for f in a[0])
    assert len({f.path for f in a[0]}) == len(a[0])


def test_rescan_of_10000_files_is_fast(tmp_path):
    root = str(tmp_path / "big")
    for d in range(50):
        sub = os.path.join(root, f"d{d:02d}")
        os.makedirs(sub)
        for i in range(200):
            open(os.path.join(sub, f"img{i:03d}.jpg"), "wb").close()
        open(os.path.join(sub, "notes.txt"), "wb").close()
    scan([root])  # warm the dentry cache, as a re-scan finds it
    c = time.process_time()
    files, problems = scan([root])
    cpu = time.process_time() - c
    assert len(files) == 10_000 and problems == []
    # CPU time is what the scan costs (about 0.1 s here), unlike the wall clock steady under machine load
    assert cpu < 1.0, f"re-scan of 10,000 files took {cpu:.2f} s of CPU"


def test_hash_file(tmp_path):
    a = make_png(str(tmp_path / "a.png"), (20, 20), seed=1)
    b = str(tmp_path / "b.png")
    with open(a, "rb") as f, open(b, "wb") as g:
        g.write(f.read())
    c = make_png(str(tmp_path / "c.png"), (20, 20), seed=2)
    assert hash_file(a) == hash_file(b) != hash_file(c)
    t = make_text_file(str(tmp_path / "abc.txt"), "abc")
    assert hash_file(t) == hashlib.sha256(b"abc").hexdigest()
    big = str(tmp_path / "big.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(3 << 20))
    with open(big, "rb") as f:
        assert hash_file(big) == hashlib.sha256(f.read()).hexdigest()


def test_default_excludes_skip_nas_thumbnails_node_modules_and_git(tmp_path):
    root = str(tmp_path / "lib")
    for rel in [
        "keep.jpg",
        "@eaDir/keep.jpg/SYNOPHOTO_THUMB_XL.jpg",
        "web/node_modules/pkg/logo.png",
        ".git/objects/x.jpg",
        "album/@eaDir/t.jpg",
        "album/p.jpg",
    ]:
        touch(os.path.join(root, rel))
    assert names(scan([root])[0], root) == ["album/p.jpg", "keep.jpg"]
    # --include-hidden brings hidden folders back, but not the default excludes (.git stays out)
    touch(os.path.join(root, ".photos/h.jpg"))
    assert names(scan([root], include_hidden=True)[0], root) == [".photos/h.jpg", "album/p.jpg", "keep.jpg"]
    # the explicit way to walk them all
    got = names(scan([root], include_hidden=True, default_excludes=())[0], root)
    assert {
        "@eaDir/keep.jpg/SYNOPHOTO_THUMB_XL.jpg",
        "web/node_modules/pkg/logo.png",
        ".git/objects/x.jpg",
        "album/@eaDir/t.jpg",
    } <= set(got)
    # user excludes still add to the defaults
    assert names(scan([root], exclude=["album"])[0], root) == ["keep.jpg"]
