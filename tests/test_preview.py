"""Terminal previews: protocol detection from the environment, and the kitty and iTerm2 escape codes, decoded
back to the image they carry; `search --preview` end to end."""

from __future__ import annotations

import base64
import io
import re

import pytest
from click.testing import CliRunner
from conftest import build_index, write_photos
from photo_files import make_heic
from PIL import Image

from retrieval.cli import main
from retrieval.preview import detect, iterm2_escape, kitty_escape, thumbnail_png

KITTY = re.compile(r"\x1b_G([^;]*);([A-Za-z0-9+/=]*)\x1b\\")
ITERM = re.compile(r"\x1b\]1337;File=([^:]*):([A-Za-z0-9+/=]*)\x07")


def decode_kitty(text: str):
    chunks = KITTY.findall(text)
    assert chunks, "no kitty graphics command"
    first = dict(kv.split("=") for kv in chunks[0][0].split(","))
    assert [dict(kv.split("=") for kv in c[0].split(","))["m"] for c in chunks] == ["1"] * (len(chunks) - 1) + ["0"]
    assert all(len(c[1]) == 4096 for c in chunks[:-1])
    return first, Image.open(io.BytesIO(base64.b64decode("".join(c[1] for c in chunks))))


def decode_iterm2(text: str):
    m = ITERM.search(text)
    assert m, "no iTerm2 inline image"
    args = dict(kv.split("=", 1) for kv in m.group(1).split(";"))
    data = base64.b64decode(m.group(2))
    assert int(args["size"]) == len(data)
    return args, Image.open(io.BytesIO(data))


@pytest.mark.parametrize(
    "env,protocol",
    [
        ({"TERM": "xterm-kitty"}, "kitty"),
        ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "3"}, "kitty"),
        ({"TERM_PROGRAM": "ghostty"}, "kitty"),
        ({"TERM_PROGRAM": "iTerm.app"}, "iterm2"),
        ({"TERM_PROGRAM": "WezTerm"}, "iterm2"),
        ({"LC_TERMINAL": "iTerm2", "TERM": "xterm-256color"}, "iterm2"),
        ({"KONSOLE_VERSION": "230402"}, "kitty"),
        ({"TERM": "xterm-256color"}, None),
        ({"TERM": "xterm-kitty", "TMUX": "/tmp/tmux-1/default,1,0"}, None),
        ({"TERM": "xterm-256color", "RETRIEVAL_PREVIEW": "iterm2"}, "iterm2"),
        ({"TERM": "xterm-kitty", "RETRIEVAL_PREVIEW": "none"}, None),
    ],
)
def test_detect(env, protocol):
    d = detect(env)
    assert d.protocol == protocol and d.reason
    if protocol is None and "RETRIEVAL_PREVIEW" not in env:
        assert "TERM" in d.reason or "tmux" in d.reason


def test_not_a_tty_is_said_plainly():
    d = detect({"TERM": "xterm-kitty"}, isatty=False)
    assert d.protocol is None and "not a terminal" in d.reason


def test_kitty_escape_round_trips_a_large_image():
    img = Image.effect_noise((200, 150), 60).convert("RGB")  # noise: the PNG spans several 4096-byte chunks
    buf = io.BytesIO()
    img.save(buf, "PNG")
    keys, back = decode_kitty(kitty_escape(buf.getvalue(), rows=6))
    assert keys["f"] == "100" and keys["a"] == "T" and keys["r"] == "6"
    assert back.size == (200, 150) and back.convert("RGB").tobytes() == img.tobytes()


def test_iterm2_escape_round_trips():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    args, back = decode_iterm2(iterm2_escape(buf.getvalue(), rows=5, name="café.jpg"))
    assert args["inline"] == "1" and args["height"] == "5" and base64.b64decode(args["name"]).decode() == "café.jpg"
    assert back.getpixel((3, 3)) == (10, 200, 30)


def test_thumbnail_of_a_heic_is_small(tmp_path):
    p = make_heic(tmp_path / "x.heic", size=(800, 600))
    with Image.open(io.BytesIO(thumbnail_png(str(p)))) as im:
        assert im.size == (320, 240)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    photos = write_photos(root / "photos", 4)
    build_index(root / "idx", photos)
    return root, photos


def test_search_preview_kitty_and_iterm2(indexed):
    root, photos = indexed
    r = CliRunner().invoke(
        main,
        ["search", "shapes", "--index", str(root / "idx"), "-k", "2", "--preview"],
        env={"RETRIEVAL_PREVIEW": "kitty"},
    )
    assert r.exit_code == 0, r.output
    images = r.output.split("\x1b_Gf=100")
    assert len(images) == 3  # one per result
    _, im = decode_kitty("\x1b_Gf=100" + images[1].split("\n   2")[0])
    assert im.size == (96, 72)
    r = CliRunner().invoke(
        main,
        ["search", "shapes", "--index", str(root / "idx"), "-k", "3", "--preview"],
        env={"RETRIEVAL_PREVIEW": "iterm2"},
    )
    assert r.exit_code == 0 and len(ITERM.findall(r.output)) == 3


def test_search_preview_says_when_the_terminal_cannot(indexed, tmp_path):
    root, photos = indexed
    r = CliRunner().invoke(
        main,
        ["search", "shapes", "--index", str(root / "idx"), "-k", "2", "--preview"],
        env={"RETRIEVAL_PREVIEW": "", "TERM": "dumb", "TERM_PROGRAM": ""},
    )
    assert r.exit_code == 0
    assert "no previews:" in r.output and "\x1b" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip().startswith(("1 ", "2 "))]) == 2
    r = CliRunner().invoke(main, ["search", "shapes", "--index", str(root / "idx"), "--preview", "--json"])
    assert r.exit_code == 2


def test_missing_file_gets_a_note_not_a_traceback(indexed):
    root, photos = indexed
    photos[0].rename(photos[0].with_suffix(".gone"))
    try:
        r = CliRunner().invoke(
            main,
            ["search", "shapes", "--index", str(root / "idx"), "-k", "4", "--preview"],
            env={"RETRIEVAL_PREVIEW": "kitty"},
        )
        assert r.exit_code == 0, r.output
        assert "(no preview: no such file)" in r.output and r.output.count("\x1b_Gf=100") == 3
    finally:
        photos[0].with_suffix(".gone").rename(photos[0])
