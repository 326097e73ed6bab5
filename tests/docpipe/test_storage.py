"""Storage against the local filesystem and a real S3 API (moto server on loopback)."""

from __future__ import annotations

import hashlib
import json

import boto3
import pytest

from docpipe.data.landing import COMPLETE_MARKER, LABELS_FILE, LabelRecord, read_marker, write_batch
from docpipe.storage import LocalStorage, S3Storage, StorageError, open_storage


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty store of each kind."""
    if request.param == "local":
        return open_storage(tmp_path / "store")
    s3_config = request.getfixturevalue("s3_config")
    bucket = request.getfixturevalue("bucket")
    return open_storage(f"s3://{bucket}/some/prefix", s3_config)


def test_open_storage_picks_the_backend(tmp_path, s3_config):
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage("s3://bucket/prefix", s3_config), S3Storage)
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        open_storage("s3:///x")


def test_write_read_list_hash(store):
    store.write_bytes("a/b/one.bin", b"first")
    store.write_bytes("a/b/one.bin", b"second")  # replaced whole
    store.write_bytes("a/two.txt", "二".encode())
    store.write_bytes("top.json", b"{}")
    assert store.read_bytes("a/b/one.bin") == b"second"
    assert store.exists("a/two.txt") and not store.exists("a/missing")
    assert sorted(store.list()) == ["a/b/one.bin", "a/two.txt", "top.json"]
    assert sorted(store.list("a")) == ["a/b/one.bin", "a/two.txt"]
    assert store.sha256("a/b/one.bin") == hashlib.sha256(b"second").hexdigest()


def test_child_is_rooted_below(store):
    child = store.child("batch-1")
    child.write_bytes("labels.jsonl", b"x\n")
    assert store.read_bytes("batch-1/labels.jsonl") == b"x\n"
    assert child.uri == store.uri_of("batch-1")


def test_missing_object_error_names_the_uri(store):
    with pytest.raises(StorageError) as caught:
        store.read_bytes("nope.bin")
    assert store.uri_of("nope.bin") in str(caught.value)


@pytest.mark.parametrize("key", ["../escape", "/absolute", "a/../../b", ""])
def test_keys_cannot_escape_the_root(store, key):
    with pytest.raises(StorageError, match="invalid key"):
        store.write_bytes(key, b"x")


def test_keys_are_normalised(store):
    store.write_bytes("a//./b.bin", b"x")
    assert store.read_bytes("a/b.bin") == b"x" and list(store.list()) == ["a/b.bin"]


def test_local_symlinks_may_point_inside_the_root_only(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"secret")
    store = LocalStorage(tmp_path / "root")
    store.write_bytes("data/real.bin", b"inside")
    (tmp_path / "root" / "inner.bin").symlink_to(tmp_path / "root" / "data" / "real.bin")
    (tmp_path / "root" / "outer.bin").symlink_to(tmp_path / "outside.bin")
    assert store.read_bytes("inner.bin") == b"inside"
    with pytest.raises(StorageError, match="outer.bin: a symbolic link pointing outside"):
        store.read_bytes("outer.bin")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the old content and no temporary file."""
    store = LocalStorage(tmp_path)
    store.write_bytes("f.bin", b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("f.bin", b"new content")
    assert store.read_bytes("f.bin") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_local_write_gives_ordinary_permissions(tmp_path):
    """Atomic writes go through a private temp file; the result is readable as open() would leave it."""
    store = LocalStorage(tmp_path)
    store.write_bytes("f.bin", b"x")
    (tmp_path / "plain.bin").write_bytes(b"x")
    assert (tmp_path / "f.bin").stat().st_mode == (tmp_path / "plain.bin").stat().st_mode


def test_s3_missing_bucket_is_a_clear_error(s3_config):
    store = open_storage("s3://no-such-bucket/x", s3_config)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x/f: cannot write: NoSuchBucket"):
        store.write_bytes("f", b"x")


def test_s3_transient_errors_are_retried_with_backoff(bucket, s3_config):
    """A 503 from the server is retried (botocore standard mode) up to max_attempts in all."""
    from botocore.awsrequest import AWSResponse

    class Unavailable:
        def stream(self, **kwargs):
            yield b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"

    store = open_storage(f"s3://{bucket}/p", s3_config.model_copy(update={"max_attempts": 3}))
    attempts = []

    def refuse(request, **kwargs):
        attempts.append(request.url)
        return AWSResponse(request.url, 503, {}, Unavailable())

    store.client.meta.events.register("before-send.s3.PutObject", refuse)
    with pytest.raises(StorageError, match="cannot write: SlowDown"):
        store.write_bytes("f", b"x")
    assert len(attempts) == 3


def test_s3_objects_are_real_objects(bucket, s3_config):
    """What S3Storage writes is visible through a plain boto3 client at the expected key."""
    open_storage(f"s3://{bucket}/landing", s3_config).write_bytes("b1/labels.jsonl", b"{}\n")
    client = boto3.client("s3", endpoint_url=s3_config.endpoint_url, region_name="us-east-1")
    body = client.get_object(Bucket=bucket, Key="landing/b1/labels.jsonl")["Body"].read()
    assert body == b"{}\n"


def test_landing_batch_round_trip(store):
    records = [
        (LabelRecord(image=f"images/{i}.jpg", doc_type="receipt_en", fields={"total": f"{i}.00"}), bytes([i]) * 10)
        for i in range(3)
    ]
    assert read_marker(store) is None
    marker = write_batch(store, records, producer="test")
    assert read_marker(store) == marker and marker.records == 3
    lines = store.read_bytes(LABELS_FILE).decode().splitlines()
    assert [json.loads(line)["image"] for line in lines] == ["images/0.jpg", "images/1.jpg", "images/2.jpg"]
    assert marker.labels_sha256 == store.sha256(LABELS_FILE)
    assert store.read_bytes("images/2.jpg") == bytes([2]) * 10


def test_complete_batch_is_never_overwritten(store):
    write_batch(store, [(LabelRecord(image="a.jpg", doc_type="t", fields={}), b"a")], producer="first")
    before = store.read_bytes(COMPLETE_MARKER)
    with pytest.raises(StorageError, match="already complete"):
        write_batch(store, [(LabelRecord(image="a.jpg", doc_type="t", fields={}), b"b")], producer="second")
    assert store.read_bytes("a.jpg") == b"a" and store.read_bytes(COMPLETE_MARKER) == before


def test_marker_is_written_last(store, monkeypatch):
    """A batch whose labels failed to write has no marker, so nothing reads it."""
    original = store.write_bytes

    def failing(key, data):
        if key == LABELS_FILE:
            raise StorageError("simulated outage")
        original(key, data)

    monkeypatch.setattr(store, "write_bytes", failing)
    with pytest.raises(StorageError):
        write_batch(store, [(LabelRecord(image="a.jpg", doc_type="t", fields={}), b"a")], producer="x")
    assert read_marker(store) is None
