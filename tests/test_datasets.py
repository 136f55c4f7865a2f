"""Caption corpus readers: every format round trip, detection, malformed input, sidecars, path resolution."""

from __future__ import annotations

import csv
import json
import os

import pytest

from retrieval.caption_text import CaptionRecord
from retrieval.datasets import detect_format, group_by_image, read_captions, resolve_image_path
from retrieval.errors import DatasetFormatError, RetrievalError
from retrieval.sidecar import SIDECAR_MAX_CHARS, SIDECAR_MAX_LINES, read_sidecar, sidecar_paths

TRICKY = [
    ("a.jpg", 'A dog, running "fast" on grass'),
    ("a.jpg", "Second caption\nspanning two lines"),
    ("sub/b.png", "  padded, with commas, and quotes \"'  "),
    ("sub/b.png", "Ünïcödé ☃ caption"),
    ("c.jpg", "plain"),
]


def pairs(records):
    return [(r.image, r.caption) for r in records]


def stripped(rows):
    return [(i, c.strip()) for i, c in rows]


def write_csv(path, header, rows, delimiter=",", bom=False):
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


def one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, msg
    assert isinstance(excinfo.value, RetrievalError)


# ---------------------------------------------------------------------------------------------------- CSV / TSV


def test_csv_round_trip_commas_quotes_newlines(tmp_path):
    p = tmp_path / "caps.csv"
    write_csv(p, ["image", "caption"], TRICKY, bom=True)
    records = read_captions(p)
    assert pairs(records) == stripped(TRICKY)
    assert all(r.source == "csv" and r.split is None for r in records)
    assert group_by_image(records) == {
        "a.jpg": [TRICKY[0][1], TRICKY[1][1]],
        "sub/b.png": [TRICKY[2][1].strip(), TRICKY[3][1]],
        "c.jpg": ["plain"],
    }


@pytest.mark.parametrize(
    "image_col,caption_col",
    [("filepath", "title"), ("file_name", "text"), ("path", "caption"), ("Image", "Caption"), ("filename", "txt")],
)
def test_csv_column_aliases(tmp_path, image_col, caption_col):
    p = tmp_path / "caps.csv"
    write_csv(p, ["id", image_col, "extra", caption_col], [[1, "x.jpg", "e", "hello, world"]])
    assert pairs(read_captions(p, "csv")) == [("x.jpg", "hello, world")]


def test_tsv_and_empty_captions_dropped(tmp_path):
    p = tmp_path / "caps.tsv"
    write_csv(p, ["filepath", "title"], TRICKY + [("d.jpg", "   "), ("e.jpg", "")], delimiter="\t")
    assert detect_format(p) == "csv"
    assert pairs(read_captions(p)) == stripped(TRICKY)


def test_csv_unknown_extension_sniffed(tmp_path):
    p = tmp_path / "caps.txt"
    write_csv(p, ["image", "caption"], TRICKY[:2], delimiter="\t")
    assert detect_format(p) == "csv"
    assert pairs(read_captions(p)) == stripped(TRICKY[:2])


def test_csv_split_column(tmp_path):
    p = tmp_path / "caps.csv"
    write_csv(p, ["image", "caption", "split"], [["a.jpg", "one", "train"], ["b.jpg", "two", "test"]])
    recs = read_captions(p, split="test")
    assert recs == [CaptionRecord("b.jpg", "two", "csv", "test")]


def test_csv_missing_column(tmp_path):
    p = tmp_path / "caps.csv"
    write_csv(p, ["image", "label"], [["a.jpg", "x"]])
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p)
    one_line_error(e, str(p), "line 1", "caption column")


def test_csv_wrong_field_count_names_line(tmp_path):
    p = tmp_path / "caps.csv"
    p.write_text("image,caption\na.jpg,fine\nb.jpg,a dog, unquoted\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p)
    one_line_error(e, str(p), "line 3", "3 fields")


def test_csv_bad_quoting(tmp_path):
    p = tmp_path / "caps.csv"
    p.write_text('image,caption\na.jpg,"never closed\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p)
    one_line_error(e, str(p))


def test_csv_non_utf8(tmp_path):
    p = tmp_path / "caps.csv"
    p.write_bytes(b"image,caption\na.jpg,ok\nb.jpg,caf\xe9 latin-1\n")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p)
    one_line_error(e, str(p), "line 3", "UTF-8")


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl", "empty.json", "empty.dat"])
@pytest.mark.parametrize("content", [b"", b"  \n\n", b"\xef\xbb\xbf"])
def test_empty_files(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p)
    one_line_error(e, str(p), "empty")


def test_header_only_and_missing_file(tmp_path):
    p = tmp_path / "caps.csv"
    p.write_text("image,caption\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p)
    one_line_error(e, "no captions")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(tmp_path / "nope.csv")
    one_line_error(e, "nope.csv")
    with pytest.raises(DatasetFormatError):
        read_captions(tmp_path)  # a directory
    with pytest.raises(DatasetFormatError):
        read_captions(p, fmt="parquet")


# ---------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip_with_aliases_and_captions_list(tmp_path):
    p = tmp_path / "caps.jsonl"
    lines = [
        json.dumps({"image": "a.jpg", "caption": TRICKY[0][1]}),
        "",
        json.dumps({"filepath": "b.jpg", "text": " spaced "}),
        "   ",
        json.dumps({"file_name": "c.jpg", "captions": ["one", "", "two, three"]}),
        json.dumps({"path": "d.jpg", "title": "t", "captions": ["u"], "split": "val"}),
    ]
    p.write_text("\r\n".join(lines) + "\n", encoding="utf-8")
    recs = read_captions(p)
    assert pairs(recs) == [
        ("a.jpg", TRICKY[0][1]),
        ("b.jpg", "spaced"),
        ("c.jpg", "one"),
        ("c.jpg", "two, three"),
        ("d.jpg", "t"),
        ("d.jpg", "u"),
    ]
    assert {r.source for r in recs} == {"jsonl"}
    assert [r.caption for r in read_captions(p, split="val")] == ["t", "u"]


def test_jsonl_lone_surrogate_is_made_encodable(tmp_path):
    p = tmp_path / "caps.jsonl"
    p.write_text('{"image": "a.jpg", "caption": "bad \\ud800 escape"}\n', encoding="utf-8")
    (rec,) = read_captions(p)
    rec.caption.encode("utf-8")  # must not raise
    assert rec.caption.startswith("bad ")


def test_json_array_of_records(tmp_path):
    p = tmp_path / "caps.json"
    p.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "captions": ["y"]}]))
    assert detect_format(p) == "jsonl"
    assert pairs(read_captions(p)) == [("a.jpg", "x"), ("b.jpg", "y")]


@pytest.mark.parametrize(
    "bad_line,fragment",
    [
        ('{"image": "b.jpg", "caption": ', "invalid JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"caption": "no image"}', "no image key"),
        ('{"image": "b.jpg"}', "no caption key"),
        ('{"image": "b.jpg", "caption": 5}', "must be a string"),
        ('{"image": "b.jpg", "captions": "not a list"}', "list of strings"),
        ('{"image": 3, "caption": "x"}', "non-empty string"),
    ],
)
def test_jsonl_bad_line_names_line_number(tmp_path, bad_line, fragment):
    p = tmp_path / "caps.jsonl"
    p.write_text('{"image": "a.jpg", "caption": "ok"}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p)
    one_line_error(e, str(p), "line 3", fragment)


def test_jsonl_non_utf8(tmp_path):
    p = tmp_path / "caps.jsonl"
    p.write_bytes(b'{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg", "caption": "\xff\xfe"}\n')
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p)
    one_line_error(e, str(p), "line 2", "UTF-8")


def test_split_requested_without_split_info(tmp_path):
    p = tmp_path / "caps.jsonl"
    p.write_text('{"image": "a.jpg", "caption": "ok"}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p, split="test")
    one_line_error(e, "no split information")


# ---------------------------------------------------------------------------------------------------- Karpathy


def karpathy_doc():
    return {
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000000042.jpg",
                "imgid": 0,
                "split": "test",
                "sentences": [{"raw": "A cat on a mat.", "tokens": ["a", "cat"]}, {"raw": "  "}],
                "sentids": [0, 1],
                "cocoid": 42,
            },
            {
                "filepath": "train2014",
                "filename": "COCO_train2014_000000000001.jpg",
                "split": "restval",
                "sentences": [{"raw": "A dog, barking."}],
            },
            {
                "filename": "1000092795.jpg",
                "split": "train",
                "sentences": [{"raw": "Two men\nin a field"}, {"tokens": ["no", "raw", "here"]}],
            },
        ],
        "dataset": "coco",
    }


@pytest.mark.parametrize("pretty", [False, True])
def test_karpathy_round_trip_split_and_filepath(tmp_path, pretty):
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps(karpathy_doc(), indent=2 if pretty else None), encoding="utf-8")
    assert detect_format(p) == "karpathy"
    recs = read_captions(p)
    assert pairs(recs) == [
        ("val2014/COCO_val2014_000000000042.jpg", "A cat on a mat."),
        ("train2014/COCO_train2014_000000000001.jpg", "A dog, barking."),
        ("1000092795.jpg", "Two men\nin a field"),
        ("1000092795.jpg", "no raw here"),
    ]
    assert [r.split for r in recs] == ["test", "restval", "train", "train"]
    assert {r.source for r in recs} == {"karpathy"}
    test = read_captions(p, "karpathy", split="test")
    assert pairs(test) == [("val2014/COCO_val2014_000000000042.jpg", "A cat on a mat.")]
    assert len(read_captions(p, split="train")) == 2  # restval is not folded into train
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p, split="validation")
    one_line_error(e, "restval, test, train")


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda d: d.update(images="nope"), "images"),
        (lambda d: d["images"].__setitem__(0, "x"), "images[0]"),
        (lambda d: d["images"][1].pop("filename"), "images[1]"),
        (lambda d: d["images"][2].__setitem__("sentences", None), "sentences"),
        (lambda d: d["images"][0]["sentences"].__setitem__(0, {"text": "x"}), "sentences[0]"),
        (lambda d: d["images"][0].__setitem__("filepath", 7), "filepath"),
    ],
)
def test_karpathy_wrong_structure(tmp_path, mutate, fragment):
    doc = karpathy_doc()
    mutate(doc)
    p = tmp_path / "k.json"
    p.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p, "karpathy")
    one_line_error(e, str(p), fragment)


def test_json_syntax_error_names_line(tmp_path):
    p = tmp_path / "k.json"
    p.write_text('{\n  "images": [\n    {"filename": "a.jpg",,}\n  ]\n}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p, "karpathy")
    one_line_error(e, str(p), "line 3", "invalid JSON")
    with pytest.raises(DatasetFormatError):
        read_captions(p)  # auto-detection cannot classify it either


# ---------------------------------------------------------------------------------------------------- COCO


def coco_doc():
    return {
        "info": {"description": "COCO 2014"},
        "images": [
            {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 640, "height": 480},
            {"id": 73, "file_name": "COCO_val2014_000000000073.jpg"},
        ],
        "licenses": [],
        "annotations": [
            {"image_id": 73, "id": 1, "caption": "A motorcycle parked, near a wall. "},
            {"image_id": 42, "id": 2, "caption": "A cat."},
            {"image_id": 73, "id": 3, "caption": 'A "red" bike\n'},
            {"image_id": 42, "id": 4, "caption": ""},
        ],
    }


@pytest.mark.parametrize("pretty", [False, True])
def test_coco_round_trip(tmp_path, pretty):
    p = tmp_path / "captions_val2014.json"
    p.write_text(json.dumps(coco_doc(), indent=1 if pretty else None), encoding="utf-8")
    assert detect_format(p) == "coco"
    recs = read_captions(p)
    assert pairs(recs) == [
        ("COCO_val2014_000000000073.jpg", "A motorcycle parked, near a wall."),
        ("COCO_val2014_000000000042.jpg", "A cat."),
        ("COCO_val2014_000000000073.jpg", 'A "red" bike'),
    ]
    assert {r.source for r in recs} == {"coco"} and {r.split for r in recs} == {None}
    grouped = group_by_image(recs)
    assert grouped["COCO_val2014_000000000073.jpg"] == ["A motorcycle parked, near a wall.", 'A "red" bike']
    with pytest.raises(DatasetFormatError):
        read_captions(p, split="val")


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda d: d.pop("annotations"), "annotations"),
        (lambda d: d["annotations"].append({"image_id": 999, "caption": "x"}), "image_id 999"),
        (lambda d: d["annotations"].append({"image_id": 42}), "caption"),
        (lambda d: d["images"][0].pop("file_name"), "file_name"),
        (lambda d: d["images"][1].update(id=42), "duplicate"),
        (lambda d: d["annotations"].append([1, 2]), "annotations[4]"),
    ],
)
def test_coco_wrong_structure(tmp_path, mutate, fragment):
    doc = coco_doc()
    mutate(doc)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(p, "coco")
    one_line_error(e, str(p), fragment)


def test_format_mismatch_and_unrecognised_json(tmp_path):
    k = tmp_path / "k.json"
    k.write_text(json.dumps(karpathy_doc()), encoding="utf-8")
    with pytest.raises(DatasetFormatError):
        read_captions(k, "coco")
    with pytest.raises(DatasetFormatError):
        read_captions(k, "csv")
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"foo": [1, 2, 3]}), encoding="utf-8")
    with pytest.raises(DatasetFormatError) as e:
        read_captions(odd)
    one_line_error(e, str(odd), "unrecognised")
    notjson = tmp_path / "x.json"
    notjson.write_text("image,caption\na,b\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError):
        detect_format(notjson)
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x00\x01\x02\x03 no separators here")
    with pytest.raises(DatasetFormatError):
        detect_format(binary)


def test_detect_format_by_extension_and_content(tmp_path):
    cases = {
        "a.csv": "image,caption\nx,y\n",
        "a.tsv": "image\tcaption\nx\ty\n",
        "a.jsonl": '{"image": "x", "caption": "y"}\n',
        "a.ndjson": '{"image": "x", "caption": "y"}\n',
        "lines.json": '{"image": "x", "caption": "y"}\n{"image": "z", "caption": "w"}\n',
        "noext": '{"image": "x", "caption": "y"}\n',
    }
    expected = {
        "a.csv": "csv",
        "a.tsv": "csv",
        "a.jsonl": "jsonl",
        "a.ndjson": "jsonl",
        "lines.json": "jsonl",
        "noext": "jsonl",
    }
    for name, text in cases.items():
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        assert detect_format(p) == expected[name], name
        assert len(read_captions(p)) >= 1


# ---------------------------------------------------------------------------------------------------- sidecars


def test_sidecar_both_names(tmp_path):
    img = tmp_path / "photo.jpg"
    img.write_bytes(b"not really a jpeg")
    assert read_sidecar(img) == []
    (tmp_path / "photo.jpg.txt").write_text("\ufeffFirst caption\r\n\n  second  \n", encoding="utf-8")
    (tmp_path / "photo.txt").write_bytes("third\nFirst caption\nbad \xff byte\n".encode("utf-8") + b"\xff\n")
    caps = read_sidecar(img)
    assert caps[:3] == ["First caption", "second", "third"]
    assert caps[3].startswith("bad") and "\ufffd" not in caps[3]  # '\xff' here is the character ÿ
    assert caps[4] == "\ufffd"  # a raw invalid byte is replaced, not an error
    assert len(caps) == 5
    assert sidecar_paths(img) == [str(img) + ".txt", str(tmp_path / "photo.txt")]


def test_sidecar_huge_is_capped(tmp_path):
    img = tmp_path / "big.png"
    line = "x" * 5000 + "\n"
    (tmp_path / "big.txt").write_text(line * 1000, encoding="utf-8")  # ~5 MB
    caps = read_sidecar(img)
    assert 1 <= len(caps) <= SIDECAR_MAX_LINES
    assert all(len(c) <= SIDECAR_MAX_CHARS for c in caps)
    # one 5 MB line without newlines
    (tmp_path / "big.txt").write_text("y" * 5_000_000, encoding="utf-8")
    caps = read_sidecar(img)
    assert caps == ["y" * SIDECAR_MAX_CHARS]
    # many short lines
    (tmp_path / "big.txt").write_text("".join(f"caption {i}\n" for i in range(100_000)), encoding="utf-8")
    caps = read_sidecar(img)
    assert caps == [f"caption {i}" for i in range(SIDECAR_MAX_LINES)]


def test_sidecar_not_a_regular_file(tmp_path):
    img = tmp_path / "dir.jpg"
    (tmp_path / "dir.jpg.txt").mkdir()
    assert read_sidecar(img) == []
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "dir.txt")
        assert read_sidecar(img) == []  # must not block on a FIFO


# ---------------------------------------------------------------------------------------------------- paths


def test_resolve_image_path(tmp_path):
    corpus = tmp_path / "data" / "caps.csv"
    assert resolve_image_path("/abs/x.jpg", "/images", corpus) == "/abs/x.jpg"
    assert resolve_image_path("/abs/../abs/x.jpg", None, corpus) == "/abs/x.jpg"
    assert resolve_image_path("sub/x.jpg", "/images", corpus) == "/images/sub/x.jpg"
    assert resolve_image_path("sub/x.jpg", None, corpus) == str(tmp_path / "data" / "sub" / "x.jpg")
    assert resolve_image_path("../x.jpg", None, corpus) == str(tmp_path / "x.jpg")
    assert resolve_image_path("https://example.com/a.jpg", "/images", corpus) == "https://example.com/a.jpg"


def test_resolve_karpathy_and_coco_paths(tmp_path):
    k = tmp_path / "dataset_coco.json"
    k.write_text(json.dumps(karpathy_doc()), encoding="utf-8")
    rec = read_captions(k, split="test")[0]
    assert resolve_image_path(rec.image, "/coco", k) == "/coco/val2014/COCO_val2014_000000000042.jpg"
    c = tmp_path / "annotations" / "captions_val2014.json"
    c.parent.mkdir()
    c.write_text(json.dumps(coco_doc()), encoding="utf-8")
    rec = read_captions(c)[1]
    assert resolve_image_path(rec.image, "/coco/val2014", c) == "/coco/val2014/COCO_val2014_000000000042.jpg"
    assert resolve_image_path(rec.image, None, c) == str(tmp_path / "annotations" / rec.image)
