"""Find image files under folders, safely and fast; hash file contents.

`scan` walks with os.scandir (one stat per image file, none per skipped name), follows symlinks
without looping, never decodes anything, and reports what it could not read as ScanProblem
instead of raising. Only a PATH argument that does not exist raises (a user error).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat as stat_mod
from dataclasses import dataclass
from typing import Sequence

from retrieval.errors import RetrievalError
from retrieval.formats import RAW_COMPANION_EXTENSIONS, RAW_EXTENSIONS
from retrieval.images import IMAGE_EXTENSIONS

_EXTS = frozenset(IMAGE_EXTENSIONS)


@dataclass(frozen=True, order=True)
class ScannedFile:
    """One image file. `path` is absolute and normalised, as reached from the scanned root (symlinks
    are not resolved). Non-UTF-8 names are str with surrogate escapes (os.fsdecode); os.fsencode(path)
    gives back the exact bytes. Such a str cannot be encoded as UTF-8: store it with surrogateescape."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, order=True)
class ScanProblem:
    """Something under a scanned root that could not be taken, and why (one line)."""

    path: str
    reason: str


SYMLINK_LOOP = "symlink loop"
BROKEN_SYMLINK = "broken symlink"
PERMISSION_DENIED = "permission denied"
NOT_REGULAR = "not a regular file"
NOT_IMAGE = "not an image file (unsupported extension)"

# Folders no photo library wants indexed: Synology's thumbnail folders, JavaScript dependencies, git
# internals. They are default exclude patterns (matched against the bare name), so include_hidden does
# not bring ".git" back; pass default_excludes=() (CLI: --no-default-excludes) to walk them.
DEFAULT_EXCLUDES = ("@eaDir", "node_modules", ".git")


def is_image_file_name(name: str) -> bool:
    """True when `name` ends with one of retrieval.images.IMAGE_EXTENSIONS (any case)."""
    ext = os.path.splitext(name)[1]
    return bool(ext) and ext.lower() in _EXTS


def _compile_excludes(patterns: Sequence[str]):
    """One regex for all exclude globs (fnmatch syntax, case-sensitive; `*` also matches `/`)."""
    pats = [p for p in (os.fsdecode(p).strip() for p in patterns) if p]
    if not pats:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats)).match


def _excluded(match, name: str, rel: str, is_dir: bool) -> bool:
    """Exclude globs match the bare name or the path relative to the root (also written "/rel", so
    "*/thumbnails/*" catches a top-level thumbnails folder too). A folder is also tried with a
    trailing "/", so "*/thumbnails/*" prunes the folder itself instead of testing every file in it."""
    if match is None:
        return False
    if match(name) or match(rel) or match("/" + rel):
        return True
    return is_dir and bool(match(rel + "/") or match("/" + rel + "/"))


def _oserror_reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return PERMISSION_DENIED
    if e.errno == errno.ELOOP:
        return SYMLINK_LOOP
    if isinstance(e, FileNotFoundError):
        return "vanished while scanning"
    return f"cannot read: {e.strerror or type(e).__name__}"


class _Walker:
    def __init__(self, exclude, include_hidden: bool, follow_symlinks: bool):
        self.match = _compile_excludes(exclude)
        self.include_hidden = include_hidden
        self.follow = follow_symlinks
        self.visited: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every folder walked
        self.files: dict[str, tuple[str, int, int]] = {}  # realpath -> (path, size, mtime_ns)
        self.problems: dict[tuple[str, str], None] = {}  # ordered set
        # folders reached through a symlink are walked after all real folders, so that a file reachable
        # both ways keeps its real path and the alias is skipped as already visited
        self.deferred: list[tuple] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems[(path, reason)] = None

    def add_file(self, path: str, real: str, st: os.stat_result) -> None:
        old = self.files.get(real)
        if old is not None:
            # the same file reached twice: keep its real path if we have it, else the smaller path
            if (old[0] != real, old[0]) <= (path != real, path):
                return
        self.files[real] = (path, st.st_size, st.st_mtime_ns)

    # a stack entry: (dir path as reached, its real path, root path, chain of (dev, ino) above and incl.)
    def walk(self, start: tuple) -> None:
        stack = [start]
        match, hidden_ok, follow = self.match, self.include_hidden, self.follow
        while stack:
            dpath, dreal, root, chain = stack.pop()
            try:
                it = os.scandir(dpath)
            except OSError as e:
                self.problem(dpath, _oserror_reason(e))
                continue
            subdirs = []
            with it:
                while True:
                    try:
                        entry = next(it)
                    except StopIteration:
                        break
                    except OSError as e:  # an unreadable entry mid-listing: report, keep going
                        self.problem(dpath, _oserror_reason(e))
                        break
                    name = entry.name
                    if not hidden_ok and name[0] == ".":
                        continue
                    path = entry.path
                    try:
                        is_link = entry.is_symlink()
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError as e:
                        self.problem(path, _oserror_reason(e))
                        continue
                    rel = path[len(root) + 1 :] if root != "/" else path[1:]
                    if is_dir:
                        if not _excluded(match, name, rel, True):
                            subdirs.append((path, os.path.join(dreal, name), root, chain))
                        continue
                    if is_link:
                        if follow:
                            self.symlink(entry, path, rel, dreal, root, chain)
                        continue
                    if not is_image_file_name(name) or _excluded(match, name, rel, False):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError as e:
                        self.problem(path, _oserror_reason(e))
                        continue
                    if stat_mod.S_ISREG(st.st_mode):
                        self.add_file(path, os.path.join(dreal, name), st)
                    else:
                        self.problem(path, NOT_REGULAR)  # a FIFO named x.jpg would block a decoder
            # push in reverse so folders are walked in name order (only the problem order depends on it)
            for sub in sorted(subdirs, reverse=True):
                spath, sreal, sroot, schain = sub
                try:
                    st = os.stat(spath, follow_symlinks=False)
                except OSError as e:
                    self.problem(spath, _oserror_reason(e))
                    continue
                key = (st.st_dev, st.st_ino)
                if key in self.visited:
                    continue
                self.visited.add(key)
                stack.append((spath, sreal, sroot, schain + (key,)))

    def symlink(self, entry, path: str, rel: str, dreal: str, root: str, chain: tuple) -> None:
        name = entry.name
        try:
            st = os.stat(path)  # follows the link
        except FileNotFoundError:
            if not _excluded(self.match, name, rel, False):
                self.problem(path, BROKEN_SYMLINK)
            return
        except OSError as e:
            if not _excluded(self.match, name, rel, False):
                self.problem(path, _oserror_reason(e))  # ELOOP: a link that points at itself
            return
        if stat_mod.S_ISDIR(st.st_mode):
            if _excluded(self.match, name, rel, True):
                return
            key = (st.st_dev, st.st_ino)
            if key in chain:
                self.problem(path, SYMLINK_LOOP)  # points at one of its own ancestors
                return
            self.deferred.append((path, key, root, chain))
            return
        if not is_image_file_name(name) or _excluded(self.match, name, rel, False):
            return
        if not stat_mod.S_ISREG(st.st_mode):
            self.problem(path, NOT_REGULAR)
            return
        self.add_file(path, os.path.realpath(path), st)

    def run_deferred(self) -> None:
        while self.deferred:
            self.deferred.sort(reverse=True)
            path, key, root, chain = self.deferred.pop()
            if key in chain:
                self.problem(path, SYMLINK_LOOP)
                continue
            if key in self.visited:
                continue  # an alias of a folder already walked: its files are already known
            self.visited.add(key)
            self.walk((path, os.path.realpath(path), root, chain + (key,)))


def scan(
    paths: Sequence[str],
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    follow_symlinks: bool = True,
    skip_dirs: Sequence[str | os.PathLike] = (),
    default_excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> tuple[list[ScannedFile], list[ScanProblem]]:
    """Find the image files under `paths` (folders, walked recursively, or single files).

    - Image files are those whose extension is in retrieval.images.IMAGE_EXTENSIONS, any case. A folder
      named like an image ("x.jpg/") is a folder. A file PATH argument is taken as it is if it has an
      image extension (even if hidden or excluded), else it is reported as a ScanProblem.
    - Names starting with "." (files and folders) are skipped unless include_hidden. A hidden root
      given explicitly is scanned.
    - `exclude`: fnmatch globs, case-sensitive, tried against the bare name and against the path
      relative to the scanned root ("*/thumbnails/*", "*.gif", "raw"). Matching folders are pruned.
    - `default_excludes` (DEFAULT_EXCLUDES: "@eaDir", "node_modules", ".git") are added to `exclude`;
      include_hidden does not lift them, default_excludes=() does.
    - Symlinks are followed (unless follow_symlinks=False, which skips them): a link to one of its own
      ancestors is reported once as "symlink loop"; a dangling link as "broken symlink"; a folder
      already walked through another path is not walked again.
    - Unreadable folders are reported ("permission denied"), never raised. A missing PATH argument
      raises RetrievalError.
    - The same real file reached twice (two roots, or a symlink) appears once, preferably under its
      real path. Output is sorted by path; problems are sorted too.
    - `skip_dirs`: folders never walked, by identity (an index directory inside the photo folder).
    - A RAW file (retrieval.formats.RAW_EXTENSIONS) with a JPEG or HEIF of the same stem (any case) in the
      same folder is left out: they are one photo, and the JPEG is the camera's rendering of it.
    """
    w = _Walker([*exclude, *default_excludes], include_hidden, follow_symlinks)
    for d in skip_dirs:
        try:
            st = os.stat(d)
        except OSError:
            continue
        w.visited.add((st.st_dev, st.st_ino))  # looks already walked, however it is reached
    roots = []
    for p in paths:
        p = os.path.abspath(os.fsdecode(p))
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise RetrievalError(f"no such file or directory: {p}") from None
        except PermissionError:
            w.problem(p, PERMISSION_DENIED)
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:
                w.problem(p, SYMLINK_LOOP)
                continue
            raise RetrievalError(f"cannot read {p}: {e.strerror}") from None
        if stat_mod.S_ISDIR(st.st_mode):
            roots.append((os.path.islink(p), p, st))
        elif stat_mod.S_ISREG(st.st_mode):
            if is_image_file_name(p):
                w.add_file(p, os.path.realpath(p), st)
            else:
                w.problem(p, NOT_IMAGE)
        else:
            w.problem(p, NOT_REGULAR)
    # real folders first, then roots that are symlinks, each in path order; folders reached through
    # symlinks last (run_deferred)
    for _, p, st in sorted(roots, key=lambda r: (r[0], r[1])):
        key = (st.st_dev, st.st_ino)
        if key in w.visited:
            continue
        w.visited.add(key)
        w.walk((p, os.path.realpath(p), p, (key,)))
    w.run_deferred()
    files = _drop_raw_with_companion(sorted(ScannedFile(path, size, mtime) for path, size, mtime in w.files.values()))
    problems = sorted(ScanProblem(path, reason) for path, reason in w.problems)
    return files, problems


def _drop_raw_with_companion(files: list[ScannedFile]) -> list[ScannedFile]:
    """RAW+JPEG shooting gives two files of one photo: keep the JPEG (or HEIF) and leave the RAW out
    (not indexed, not reported: a RAW+JPEG library would otherwise list every RAW as skipped)."""
    companions = {
        os.path.splitext(f.path)[0].lower()
        for f in files
        if os.path.splitext(f.path)[1].lower() in RAW_COMPANION_EXTENSIONS
    }
    if not companions:
        return files
    return [
        f
        for f in files
        if not (
            os.path.splitext(f.path)[1].lower() in RAW_EXTENSIONS and os.path.splitext(f.path)[0].lower() in companions
        )
    ]
