"""Tests for the storage package: local directory and S3 (moto server on loopback)."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import boto3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moto.server import ThreadedMotoServer

from storage import Storage, StorageError, open_storage, safe_key, storage_for
from tasks.settings import Settings
from storage.local import LocalStorage
from storage.s3 import S3Storage

SECRET = "SECRET-DO-NOT-LEAK-123"
BUCKET = "ttspool-test"
MiB = 1024 * 1024


def _start_moto() -> tuple[ThreadedMotoServer, str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        # Env credentials win over any profile, so a developer's real AWS
        # config can never be used (or hit) by these tests.
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "TTSPOOL_S3_SSE"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server, endpoint = _start_moto()
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return open_storage((tmp_path / "store").as_uri())
    endpoint = request.getfixturevalue("s3_endpoint")
    return open_storage(f"s3://{BUCKET}/runs/{uuid.uuid4().hex}", s3_endpoint_url=endpoint)


def _raw_s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint)


def test_round_trip(store: Storage) -> None:
    assert isinstance(store, Storage)
    key = "job-1/utt_0001.wav"
    assert not store.exists(key)
    assert store.size(key) is None

    url = store.put_bytes(key, b"RIFF....WAVE", "audio/wav")
    assert url == store.url_for(key)
    assert url.startswith(store.base_url + "/")
    assert url.endswith("/" + key)
    assert store.exists(key)
    assert store.size(key) == 12
    assert store.get_bytes(key) == b"RIFF....WAVE"

    store.put_bytes(key, b"new")  # overwrite
    assert store.get_bytes(key) == b"new"
    assert store.size(key) == 3


def test_delete_removes_the_object_and_tolerates_a_missing_one(store: Storage) -> None:
    store.put_bytes("gone/soon.txt", b"x")
    store.delete("gone/soon.txt")
    assert not store.exists("gone/soon.txt")
    store.delete("gone/soon.txt")
    with pytest.raises(ValueError):
        store.delete("../escape")


def test_list_keys_under_a_folder(store: Storage) -> None:
    folder = f"list-{uuid.uuid4().hex[:8]}"
    assert store.list_keys(f"{folder}/") == []
    for key in (f"{folder}/b.json", f"{folder}/a.json", f"{folder}/a/v1.wav", f"{folder}x/other"):
        store.put_bytes(key, b"x")
    assert store.list_keys(f"{folder}/") == [f"{folder}/a.json", f"{folder}/a/v1.wav", f"{folder}/b.json"]
    assert store.list_keys(f"{folder}/a/") == [f"{folder}/a/v1.wav"]


def test_missing_object_read_is_storage_error(store: Storage) -> None:
    with pytest.raises(StorageError):
        store.get_bytes("nope/missing.wav")


def test_bad_key_is_rejected_by_both_backends(store: Storage) -> None:
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")
    with pytest.raises(ValueError):
        store.url_for("/abs")


def test_s3_key_layout_and_content_type(s3_endpoint: str) -> None:
    store = open_storage(f"s3://{BUCKET}/pre/fix/", s3_endpoint_url=s3_endpoint)
    assert store.base_url == f"s3://{BUCKET}/pre/fix"
    assert store.put_bytes("a/b.wav", b"data", "audio/wav") == f"s3://{BUCKET}/pre/fix/a/b.wav"
    head = _raw_s3(s3_endpoint).head_object(Bucket=BUCKET, Key="pre/fix/a/b.wav")
    assert head["ContentType"] == "audio/wav"

    bare = open_storage(f"s3://{BUCKET}", s3_endpoint_url=s3_endpoint)
    assert bare.url_for("x.wav") == f"s3://{BUCKET}/x.wav"


def test_s3_large_object_goes_multipart(s3_endpoint: str) -> None:
    store = open_storage(f"s3://{BUCKET}/big", s3_endpoint_url=s3_endpoint)
    data = os.urandom(20 * MiB)
    store.put_bytes("big.bin", data)
    head = _raw_s3(s3_endpoint).head_object(Bucket=BUCKET, Key="big/big.bin")
    # A multipart ETag is "<md5-of-part-md5s>-<part count>": 20 MiB / 8 MiB -> 3 parts.
    assert head["ETag"].strip('"').endswith("-3")
    assert store.size("big.bin") == 20 * MiB
    assert store.get_bytes("big.bin") == data


def test_s3_sse_from_settings(s3_endpoint: str) -> None:
    settings = Settings.from_env({"TTSPOOL_S3_SSE": "AES256", "TTSPOOL_STORAGE_URL": f"s3://{BUCKET}/sse",
                                  "TTSPOOL_S3_ENDPOINT_URL": s3_endpoint})
    store = storage_for(settings)
    store.put_bytes("enc.wav", b"secret audio")
    head = _raw_s3(s3_endpoint).head_object(Bucket=BUCKET, Key="sse/enc.wav")
    assert head["ServerSideEncryption"] == "AES256"

    with pytest.raises(ValueError, match="TTSPOOL_S3_SSE"):
        Settings.from_env({"TTSPOOL_S3_SSE": "rot13"})
    with pytest.raises(ValueError, match="TTSPOOL_S3_SSE"):
        open_storage(f"s3://{BUCKET}/sse", s3_endpoint_url=s3_endpoint, s3_sse="rot13")


def test_s3_endpoint_down_raises_storage_error_without_secret(s3_endpoint: str) -> None:
    server, endpoint = _start_moto()
    server.stop()
    store = S3Storage(BUCKET, "down", endpoint_url=endpoint, max_attempts=2)
    calls = [
        lambda: store.put_bytes("k.wav", b"data"),
        lambda: store.get_bytes("k.wav"),
        lambda: store.exists("k.wav"),
        lambda: store.size("k.wav"),
    ]
    for call in calls:
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert f"s3://{BUCKET}/down/k.wav" in message
        assert SECRET not in message and SECRET not in repr(info.value)


def test_s3_client_error_carries_code(s3_endpoint: str) -> None:
    store = S3Storage("no-such-bucket-here", "", endpoint_url=s3_endpoint, max_attempts=1)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.put_bytes("k.wav", b"data")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.get_bytes("k.wav")


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalStorage(root)
    assert not root.exists()  # created lazily on first write
    store.put_bytes("a/b/c.wav", b"1" * 4096)
    store.put_bytes("a/b/c.wav", b"2" * 10)
    store.put_bytes("a/d.wav", b"3")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["a/b/c.wav", "a/d.wav"]
    assert (root / "a/b/c.wav").read_bytes() == b"2" * 10
    assert (root / "a/b/c.wav").stat().st_mode & 0o777 == 0o644


def test_local_failed_write_keeps_old_object_and_cleans_up(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("x.wav", b"old")

    def fail_midway(out: IO[bytes]) -> None:
        out.write(b"partial")
        raise OSError(5, "Input/output error")

    with pytest.raises(StorageError, match="Input/output error"):
        store._write("x.wav", fail_midway)
    assert store.get_bytes("x.wav") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"]


def test_local_symlink_escape_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    store = LocalStorage(root)
    with pytest.raises(StorageError, match="outside"):
        store.put_bytes("link/x.wav", b"x")
    assert not any(outside.iterdir())


@pytest.mark.parametrize(
    "key",
    ["../x", "/abs", "a//b", "a\\b", "", "x" * 600, "a/../b", "a/", ".hidden", "a/./b", "ü.wav", "a\n"],
)
def test_safe_key_rejects(key: str) -> None:
    with pytest.raises(ValueError):
        safe_key(key)


@pytest.mark.parametrize("key", ["ab/cd.wav", "a", "job_1/utt-0001.v2.wav", "x" * 512])
def test_safe_key_accepts(key: str) -> None:
    assert safe_key(key) == key


_SEGMENTS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True)
_KEYS = st.one_of(
    st.lists(_SEGMENTS, min_size=1, max_size=6).map("/".join),
    st.text(alphabet="ab./\\-_~%:\x00 ", max_size=20),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(_KEYS)
def test_accepted_keys_stay_inside_local_root(key: str) -> None:
    try:
        safe_key(key)
    except ValueError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        store = LocalStorage(root)
        path = Path(unquote(urlsplit(store.url_for(key)).path))
        assert path.is_relative_to(root) and path != root
        assert path == (root / key).resolve()


@pytest.mark.parametrize(
    "url",
    [
        "file://rel",
        "file://rel/dir",
        "file:rel",
        "file:",
        "s3://",
        "s3:///prefix",
        "http://example.com/x",
        "/abs/dir",
        "",
        "s3://Bad_Bucket/x",
        "file:///tmp/x?y=1",
    ],
)
def test_open_storage_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_storage(url)


def test_open_storage_error_does_not_echo_url_password() -> None:
    with pytest.raises(ValueError) as info:
        open_storage("s3://user:hunter2@bucket/x")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError) as info:
        open_storage("s3://AKIATOKEN42@bucket/x")
    assert "AKIATOKEN42" not in str(info.value) and "***@" in str(info.value)


def test_open_storage_picks_backend(tmp_path: Path, s3_endpoint: str) -> None:
    local = open_storage(tmp_path.as_uri())
    assert isinstance(local, LocalStorage)
    assert local.base_url == tmp_path.resolve().as_uri()
    remote = open_storage(f"s3://{BUCKET}/p", s3_endpoint_url=s3_endpoint)
    assert isinstance(remote, S3Storage)
