import csv
import json
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydiff.data.metadata import (
    ESCAPE_REASON,
    BadSample,
    MetadataError,
    SampleError,
    read_metadata,
)


@pytest.fixture
def base(tmp_path):
    """A dataset dir with two real images, plus one image outside it."""
    root = tmp_path / "ds"
    (root / "imgs").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(root / "imgs" / name)
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "outside.png")
    return root


ROWS = [
    {"image": "imgs/a.png", "prompt": "a cat", "score": 3},
    {"image": "imgs/b.png", "prompt": "a dog", "score": 4},
]


def write(path, rows):
    ext = os.path.splitext(path)[1]
    if ext == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # trailing blank line
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def read(path, base, **kw):
    return read_metadata(path, base_path=str(base), data_file_keys=["image"], **kw)


@pytest.mark.parametrize("ext", [".csv", ".json", ".jsonl", ".parquet"])
def test_each_format(base, ext):
    rows, bad = read(write(base / f"meta{ext}", ROWS), base)
    assert bad == []
    assert [r["_row"] for r in rows] == [0, 1]
    assert rows[0]["image"] == str(base / "imgs" / "a.png")
    assert os.path.isabs(rows[1]["image"])
    assert rows[1]["prompt"] == "a dog"
    assert str(rows[1]["score"]) == "4"  # other columns pass through (CSV keeps them as text)


@pytest.mark.parametrize("ext", [".csv", ".json", ".jsonl", ".parquet"])
def test_missing_column_names_column_file_and_found(base, ext):
    path = write(base / f"meta{ext}", [{"image": "imgs/a.png", "text": "x"}])
    with pytest.raises(MetadataError) as e:
        read(path, base)
    msg = str(e.value)
    assert "'prompt'" in msg and path in msg and "'image'" in msg and "'text'" in msg


def test_missing_data_file_key_column(base):
    path = write(base / "meta.csv", [{"prompt": "x", "video": "v.mp4"}])
    with pytest.raises(MetadataError, match="missing column 'image'"):
        read(path, base)


def test_whole_file_errors(base):
    with pytest.raises(MetadataError, match="unknown metadata format"):
        read(str(base / "meta.txt"), base)
    with pytest.raises(MetadataError, match="cannot read"):
        read(str(base / "nope.csv"), base)
    (base / "bad.json").write_text("{not json")
    with pytest.raises(MetadataError, match="invalid JSON"):
        read(str(base / "bad.json"), base)
    (base / "obj.json").write_text('{"image": "imgs/a.png"}')
    with pytest.raises(MetadataError, match="list of objects"):
        read(str(base / "obj.json"), base)


def test_non_utf8_csv_row_is_bad_sample(base):
    path = base / "meta.csv"
    path.write_bytes(
        b"image,prompt\nimgs/a.png,fine\nimgs/b.png,caf\xe9 latin-1\nimgs/a.png,caf\xc3\xa9\n"
    )
    rows, bad = read(str(path), base)
    assert [r["_row"] for r in rows] == [0, 2]
    assert rows[1]["prompt"] == "café"
    assert bad == [BadSample(1, None, "text is not valid UTF-8")]
    assert str(bad[0]) == "row 1: text is not valid UTF-8"


def test_non_utf8_jsonl_line_and_bad_json_line(base):
    path = base / "meta.jsonl"
    path.write_bytes(
        b'{"image": "imgs/a.png", "prompt": "ok"}\n'
        b'{"image": "imgs/b.png", "prompt": "caf\xe9"}\n'
        b"{broken\n"
        b"[1, 2]\n"
    )
    rows, bad = read(str(path), base)
    assert [r["_row"] for r in rows] == [0]
    assert [(b.row, b.reason.split(":")[0]) for b in bad] == [
        (1, "text is not valid UTF-8"),
        (2, "invalid JSON"),
        (3, "row is not a JSON object but list"),
    ]


def test_non_utf8_json_list_is_whole_file_error(base):
    path = base / "meta.json"
    data = b'[{"image": "imgs/a.png", "prompt": "caf\xe9"}]'
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(MetadataError, match=f"byte offset {offset}$"):
        read(str(path), base)


@pytest.mark.parametrize("escape", ["../outside.png", "imgs/../../outside.png", "ABS"])
def test_path_escape_refused_and_allowed(base, escape):
    outside = str(base.parent / "outside.png")
    value = outside if escape == "ABS" else escape
    path = write(base / "meta.json", [{"image": value, "prompt": "p"}, ROWS[0]])
    rows, bad = read(path, base)
    assert [r["_row"] for r in rows] == [1]
    assert bad == [BadSample(0, value, ESCAPE_REASON)]
    assert "allow_outside_base: true" in str(bad[0])
    rows, bad = read(path, base, allow_outside_base=True)
    assert bad == [] and rows[0]["image"] == outside


def test_symlink_out_of_base_is_an_escape(base):
    os.symlink(base.parent / "outside.png", base / "imgs" / "link.png")
    path = write(base / "meta.json", [{"image": "imgs/link.png", "prompt": "p"}])
    rows, bad = read(path, base)
    assert rows == [] and bad[0].reason == ESCAPE_REASON


def test_missing_file_empty_value_and_urls(base):
    path = write(
        base / "meta.json",
        [
            {"image": "imgs/missing.png", "prompt": "p"},
            {"image": "", "prompt": "p"},
            {"image": "s3://bucket/x.png", "prompt": "p"},
            {"prompt": "no image key in this row"},
        ],
    )
    rows, bad = read(path, base)
    assert bad[0] == BadSample(0, "imgs/missing.png", "file not found (column 'image')")
    assert str(bad[0]) == "row 0, file 'imgs/missing.png': file not found (column 'image')"
    assert bad[1].row == 1 and "empty value" in bad[1].reason
    assert bad[2].row == 3 and "empty value" in bad[2].reason
    assert rows == [{"image": "s3://bucket/x.png", "prompt": "p", "_row": 2}]


def test_url_base_path_joins_without_checks(base):
    path = write(base / "meta.json", [{"image": "imgs/a.png", "prompt": "p"}, {"image": "../x.png", "prompt": "p"}])
    rows, bad = read_metadata(path, base_path="s3://bucket/ds/", data_file_keys=["image"])
    assert rows[0]["image"] == "s3://bucket/ds/imgs/a.png"
    assert bad[0].reason == ESCAPE_REASON


def test_prompts_empty_none_and_non_string(base):
    path = write(
        base / "meta.json",
        [
            {"image": "imgs/a.png", "prompt": None},
            {"image": "imgs/a.png", "prompt": ""},
            {"image": "imgs/a.png", "prompt": 42},
            {"image": "imgs/a.png"},
        ],
    )
    rows, bad = read(path, base)
    assert bad == [] and [r["prompt"] for r in rows] == ["", "", "42", ""]
    csv_path = base / "meta.csv"
    csv_path.write_text("image,prompt\nimgs/a.png,\n")
    rows, _ = read(str(csv_path), base)
    assert rows[0]["prompt"] == ""


def test_csv_row_with_extra_fields(base):
    path = base / "meta.csv"
    path.write_text("image,prompt\nimgs/a.png,p,surplus\nimgs/b.png,q\n")
    rows, bad = read(str(path), base)
    assert [r["_row"] for r in rows] == [1]
    assert bad == [BadSample(0, None, "row has 3 fields, header has 2")]


def test_sample_error_carries_bad_sample_and_pickles():
    bad = BadSample(3, "imgs/a.png", "zero-byte file")
    err = SampleError(bad)
    assert isinstance(err, ValueError)
    assert str(err) == "row 3, file 'imgs/a.png': zero-byte file"
    back = pickle.loads(pickle.dumps(err))  # Ray ships exceptions between processes
    assert back.bad == bad and str(back) == str(err)


def test_utf8_bom_is_not_part_of_the_first_column(base):
    path = base / "meta.csv"
    path.write_bytes(b"\xef\xbb\xbfimage,prompt\nimgs/a.png,p\n")
    rows, bad = read(str(path), base)
    assert bad == [] and rows[0]["image"].endswith("a.png")
