"""Sharded data without Ray: listing and counting shards, each rank's share, the bounded shuffle, reading
parquet/jsonl/csv/WebDataset records (local and on S3), hostile shards, and exact stream positions."""

import csv
import io
import itertools
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydiff.config import UserError, parse_config
from raydiff.data import records
from raydiff.data.decode import DecodeSample
from raydiff.data.metadata import SampleError
from raydiff.data.records import iter_records
from raydiff.data.shapes import write_shapes_dataset, write_shards, write_webdataset
from raydiff.data.shards import ShardPlan, count_samples, list_shards, plan_shards
from raydiff.data.stream import next_position, stream_rows


def data_config(metadata_path, base_path=".", **extra):
    return parse_config({"model": {"path": "m"}, "data": {"metadata_path": metadata_path, "base_path": base_path,
                                                          **extra}}).data


@pytest.fixture
def shapes_rows(tmp_path):
    meta = write_shapes_dataset(str(tmp_path / "images"), n=16)
    return tmp_path / "images", list(csv.DictReader(open(meta)))


def take(rows, n):
    return list(itertools.islice(rows, n))


def stream(d, plan, rank, world, start=(0, 0, 0, 0)):
    """The rank's rows, as its stream reads them before decoding."""
    return stream_rows(d, plan, rank, world, start)


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv"])
def test_a_directory_glob_or_list_of_shards_is_listed_counted_and_read_in_file_order(shapes_rows, tmp_path, kind):
    images, rows = shapes_rows
    paths = write_shards(rows, str(tmp_path / "shards"), [7, 3, 6], kind)
    for spec in (str(tmp_path / "shards"), str(tmp_path / f"shards/part-*.{kind}"), paths):
        d = data_config(spec, str(images))
        assert d.sharded and list_shards(d) == sorted(paths)
    d = data_config(str(tmp_path / "shards"), str(images))
    if kind == "parquet":  # footers only; the others are counted in Ray tasks (tests/launch)
        assert count_samples(list_shards(d), d) == [7, 3, 6]
    assert [r["image"] for r in iter_records(paths[1], kind)] == [r["image"] for r in rows[7:10]]


def test_missing_shards_fail_in_seconds_naming_the_path(tmp_path):
    for spec in (str(tmp_path / "nothing/*.parquet"), [str(tmp_path / "absent.parquet")], str(tmp_path / "empty/")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(UserError, match="no shards found there"):
            list_shards(data_config(spec))


def test_ranks_get_balanced_shares_of_unequal_shards_that_change_each_pass():
    plan = ShardPlan(tuple(f"s{i}" for i in range(6)), ("parquet",) * 6, (100, 10, 10, 50, 40, 90), seed=3)
    for p in range(4):
        shares = [plan.rank_shards(p, r, 2) for r in range(2)]
        assert sorted(sum(shares, [])) == list(range(6))  # every shard once per pass
        loads = [sum(plan.counts[i] for i in s) for s in shares]
        assert abs(loads[0] - loads[1]) <= max(plan.counts)
        assert shares == [plan.rank_shards(p, r, 2) for r in range(2)]  # a pure function of (seed, pass)
    assert {tuple(plan.rank_shards(p, 0, 2)) for p in range(6)} != {tuple(plan.rank_shards(0, 0, 2))}


def test_the_shuffle_is_chunked_bounded_seeded_and_loses_nothing(shapes_rows, tmp_path, monkeypatch):
    images, rows = shapes_rows
    write_shards(rows, str(tmp_path / "shards"), [7, 3, 6], "parquet")
    d = data_config(str(tmp_path / "shards"), str(images), shuffle_buffer=5)
    plan = plan_shards(d, seed=5)
    read = []
    original = records.iter_records

    def counted(uri, kind, start=0):
        for record in original(uri, kind, start):
            read.append(record["image"])
            yield record

    monkeypatch.setattr("raydiff.data.stream.iter_records", counted)
    rows_out = stream(d, plan, 0, 1)
    first = next(rows_out)
    assert len(read) == 5 and first["_taken"] == 0  # one chunk read ahead, no more
    one_pass = [first, *take(rows_out, 15)]
    file_order = take(stream(data_config(str(tmp_path / "shards"), str(images), shuffle=False), plan, 0, 1), 16)
    ids = [r["_row"] for r in one_pass]
    assert ids != [r["_row"] for r in file_order] and sorted(ids) == sorted(r["_row"] for r in file_order)
    for k in (0, 5, 10):  # each chunk of 5 is a permutation of the next 5 records in file order
        assert sorted(ids[k:k + 5]) == sorted(r["_row"] for r in file_order[k:k + 5])
    assert ids == [r["_row"] for r in take(stream(d, plan, 0, 1), 16)]  # seeded


def test_a_resumed_stream_continues_exactly_where_it_stopped_across_passes(shapes_rows, tmp_path):
    images, rows = shapes_rows
    write_shards(rows, str(tmp_path / "shards"), [7, 3, 6], "parquet")
    d = data_config(str(tmp_path / "shards"), str(images), shuffle_buffer=4)
    plan = plan_shards(d, seed=5)
    first_pass = []
    for rank in range(2):
        whole = take(stream(d, plan, rank, 2), 40)  # several passes of this rank's ~8 samples
        first_pass.append({r["_row"] for r in whole if r["_pass"] == 0})
        assert len({r["_pass"] for r in whole}) > 2
        for k in (3, 9, 17):
            position = next_position({key: [whole[k - 1][key]] for key in ("_pass", "_cursor", "_offset", "_taken")})
            resumed = take(stream(d, plan, rank, 2, start=position), 40 - k)
            assert [r["_row"] for r in resumed] == [r["_row"] for r in whole[k:]]
    assert not first_pass[0] & first_pass[1] and len(first_pass[0] | first_pass[1]) == 16  # a pass covers all once


def test_a_resumed_stream_seeks_to_its_chunk_without_reading_earlier_shards(shapes_rows, tmp_path, monkeypatch):
    """Resume reads from the chunk's shard and record on (parquet skips the row groups before it), not from
    the start of the pass."""
    images, rows = shapes_rows
    paths = write_shards(rows, str(tmp_path / "shards"), [10, 6], "parquet", row_group_size=2)
    d = data_config(str(tmp_path / "shards"), str(images), shuffle_buffer=3, shuffle=False)
    plan = plan_shards(d, seed=0)
    whole = take(stream(d, plan, 0, 1), 16)
    opened, original = [], records.iter_records
    monkeypatch.setattr("raydiff.data.stream.iter_records",
                        lambda uri, kind, start=0: (opened.append((uri, start)), original(uri, kind, start))[1])
    position = next_position({key: [whole[13][key]] for key in ("_pass", "_cursor", "_offset", "_taken")})
    shard_order = [plan.shards[i] for i in plan.rank_shards(0, 0, 1)]
    assert position[1] == 1 and position[2] > 0  # its chunk starts inside the second shard
    resumed = take(stream(d, plan, 0, 1, start=position), 2)
    assert [r["_row"] for r in resumed] == [r["_row"] for r in whole[14:16]]
    assert opened == [(shard_order[1], position[2])]
    assert [r["image"] for r in records.iter_records(paths[0], "parquet", start=5)] == [
        r["image"] for r in rows[5:10]]


def test_images_inside_parquet_and_webdataset_are_decoded_from_bytes(shapes_rows, tmp_path):
    images, rows = shapes_rows
    hf = [{"image": {"bytes": (images / r["image"]).read_bytes(), "path": r["image"]}, "prompt": r["prompt"]}
          for r in rows]
    pq.write_table(pa.Table.from_pylist(hf), tmp_path / "hf.parquet")
    write_webdataset(str(tmp_path / "wds"), [4, 4])
    for d in (data_config([str(tmp_path / "hf.parquet")], height=32, width=32),
              data_config(str(tmp_path / "wds"), format="webdataset", height=32, width=32)):
        plan = plan_shards(d, seed=0) if d.format != "webdataset" else ShardPlan(
            tuple(list_shards(d)), ("webdataset",) * 2, (4, 4), 0)
        row = next(stream(d, plan, 0, 1))
        assert isinstance(row["image"], bytes) and row["prompt"].startswith("a ")
        sample = DecodeSample(d)(row)[0]
        assert sample["image"].shape == (32, 32, 3)


def test_hostile_shards_name_the_shard_and_record(shapes_rows, tmp_path):
    images, rows = shapes_rows
    wds = write_webdataset(str(tmp_path / "wds"), [3])
    data = Path(wds[0]).read_bytes()
    Path(wds[0]).write_bytes(data[: len(data) // 2])  # truncated tar
    d = data_config(str(tmp_path / "wds"), format="webdataset")
    plan = ShardPlan(tuple(wds), ("webdataset",), (3,), 0)
    with pytest.raises(SampleError, match=r"truncated or corrupt tar.*shard .*shard-00000.tar"):
        take(stream(d, plan, 0, 1), 3)
    skipping = data_config(str(tmp_path / "wds"), format="webdataset", skip_bad_samples=True, shuffle=False)
    assert len(take(stream(skipping, plan, 0, 1), 2)) == 2  # the whole samples before the cut remain

    bad = [{"image": rows[0]["image"], "prompt": "ok"}, {"image": "", "prompt": "no file"},
           {"image": "../../etc/passwd", "prompt": "escape"}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    d = data_config([str(tmp_path / "bad.parquet")], str(images), shuffle=False)
    with pytest.raises(SampleError, match=r"empty or non-path value in column 'image' \(shard .*bad.parquet, "
                                          r"record 1\)"):
        take(stream(d, plan_shards(d, 0), 0, 1), 2)

    undecodable = io.BytesIO()
    with tarfile.open(fileobj=undecodable, mode="w") as tar:
        for name, payload in (("0.png", b"not a png"), ("0.txt", b"broken")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "undecodable").mkdir()
    (tmp_path / "undecodable" / "x.tar").write_bytes(undecodable.getvalue())
    d = data_config(str(tmp_path / "undecodable"), format="webdataset")
    row = next(stream(d, ShardPlan((str(tmp_path / "undecodable/x.tar"),), ("webdataset",), (1,), 0), 0, 1))
    with pytest.raises(SampleError, match="not an image"):
        DecodeSample(d)(row)


def test_the_driver_builds_sharded_training_data_without_reading_rows(shapes_rows, tmp_path, monkeypatch):
    import ray

    from raydiff.data.dataset import build_train_data

    images, rows = shapes_rows
    write_shards(rows, str(tmp_path / "shards"), [7, 3, 6], "parquet")
    cfg = parse_config({"model": {"path": "m"}, "ray": {"num_workers": 2},
                        "data": {"metadata_path": str(tmp_path / "shards"), "base_path": str(images)}})

    def refuse(*args, **kwargs):
        raise AssertionError("the driver materialised rows")

    monkeypatch.setattr(ray.data, "from_items", refuse)
    monkeypatch.setattr("raydiff.data.records.iter_records", refuse)
    train = build_train_data(cfg, None, seed=0)
    assert train.dataset is None and train.num_samples == 16 and train.shards.counts == (7, 3, 6)


def test_shards_on_s3_are_listed_counted_and_streamed(shapes_rows, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="data")
        images, rows = shapes_rows
        hf = [{"image": (images / r["image"]).read_bytes(), "prompt": r["prompt"]} for r in rows]
        for k, part in enumerate((hf[:9], hf[9:])):
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(part), buf)
            client.put_object(Bucket="data", Key=f"laion/part-{k}.parquet", Body=buf.getvalue())
        for k, tar in enumerate(write_webdataset(str(tmp_path / "wds"), [2, 3])):
            client.put_object(Bucket="data", Key=f"wds/shard-{k}.tar", Body=Path(tar).read_bytes())

        d = data_config("s3://data/laion/part-*.parquet", height=32, width=32)
        plan = plan_shards(d, seed=0)
        assert plan.shards == ("s3://data/laion/part-0.parquet", "s3://data/laion/part-1.parquet")
        assert plan.counts == (9, 7)
        row = next(stream(d, plan, 1, 2))
        assert DecodeSample(d)(row)[0]["image"].shape == (32, 32, 3)
        w = data_config("s3://data/wds/", format="webdataset")
        assert list_shards(w) == ["s3://data/wds/shard-0.tar", "s3://data/wds/shard-1.tar"]
        assert [sum(1 for _ in iter_records(s, "webdataset")) for s in list_shards(w)] == [2, 3]
    finally:
        server.stop()


def test_sharded_data_refuses_what_only_listed_data_can_do(tmp_path):
    (tmp_path / "shards").mkdir()
    for extra, word in (({"buckets": True}, "data.buckets"), ({"preprocess": "stream"}, "data.preprocess: stream")):
        with pytest.raises(Exception, match=word):
            data_config(str(tmp_path / "shards"), **extra)
    with pytest.raises(Exception, match="eval.holdout"):
        parse_config({"model": {"path": "m"}, "data": {"metadata_path": str(tmp_path / "shards")},
                      "eval": {"holdout": 2}})
    assert json.loads(json.dumps(data_config([str(tmp_path / "a.parquet")]).metadata_path))
