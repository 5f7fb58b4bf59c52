"""Weight store: immutable versions, atomic publish, incomplete versions invisible.

Every test runs on the local-directory backend and on the fsspec backend over ``file://`` and
``memory://``.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from pathlib import Path

import fsspec
import pytest

from storage.errors import CorruptVersion, VersionExists, VersionNotFound, WeightStoreError
from storage.weights import (
    MARKER,
    FsspecWeightStore,
    LocalWeightStore,
    WeightStore,
    open_weight_store,
)


@pytest.fixture(params=["local", "file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> WeightStore:
    if request.param == "local":
        return open_weight_store(tmp_path / "weights")
    if request.param == "file":
        return open_weight_store(f"file://{tmp_path}/weights")
    return open_weight_store(f"memory://prefloop-{uuid.uuid4().hex}")


def _put_raw(store: WeightStore, kind: str, name: str, rel: str, data: bytes) -> None:
    """Write a file behind the store's back (a half-copied or foreign directory)."""
    if isinstance(store, LocalWeightStore):
        target = store.root / kind / name / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    else:
        assert isinstance(store, FsspecWeightStore)
        path = f"{store.base}/{kind}/{name}/{rel}"
        store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        store.fs.pipe_file(path, data)


def test_backends_are_chosen_by_location(tmp_path: Path) -> None:
    assert isinstance(open_weight_store(tmp_path), LocalWeightStore)
    assert isinstance(open_weight_store(str(tmp_path)), LocalWeightStore)
    assert isinstance(open_weight_store(f"file://{tmp_path}"), FsspecWeightStore)
    assert isinstance(open_weight_store("memory://x"), FsspecWeightStore)


def test_publish_then_read_back(store: WeightStore) -> None:
    files = {"model.safetensors": b"\x00\x01weights", "config/head.json": b'{"dim": 4}'}
    published = store.publish("rm", 1, files)
    assert published.files == {name: hashlib.sha256(d).hexdigest() for name, d in files.items()}
    store.publish("rm", 3, lambda d: (d / "w.bin").write_bytes(b"v3"))
    assert store.versions("rm") == [1, 3]
    assert store.latest("rm").version == 3
    assert store.latest("policy") is None
    assert store.read_bytes("rm", 1, "config/head.json") == b'{"dim": 4}'
    assert store.get("rm", 1).files == published.files
    assert store.verify("rm", 3).version == 3
    with pytest.raises(VersionExists, match="weights rm v1 already exist"):
        store.publish("rm", 1, {"other.bin": b"x"})
    assert store.read_bytes("rm", 1, "model.safetensors") == b"\x00\x01weights"


def test_a_writer_that_raises_leaves_nothing_visible(store: WeightStore) -> None:
    def half_written(directory: Path) -> None:
        (directory / "shard-0.bin").write_bytes(b"0" * 1024)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.publish("policy", 2, half_written)
    assert store.versions("policy") == []
    assert store.latest("policy") is None
    with pytest.raises(VersionNotFound, match="no complete version"):
        store.get("policy", 2)
    assert store.publish("policy", 2, {"ok.bin": b"1"}).version == 2  # nothing left behind
    if isinstance(store, LocalWeightStore):
        assert sorted(p.name for p in (store.root / "policy").iterdir()) == ["v2"]


def test_a_directory_without_marker_is_ignored(store: WeightStore) -> None:
    store.publish("rm", 1, {"w.bin": b"one"})
    _put_raw(store, "rm", "v7", "w.bin", b"half")  # copied without COMPLETE
    _put_raw(store, "rm", "scratch", MARKER, b"{}")  # not a version name
    assert store.versions("rm") == [1]
    assert store.latest("rm").version == 1
    with pytest.raises(VersionNotFound, match=r"complete versions: \[1\]"):
        store.get("rm", 7)


def test_concurrent_publish_of_one_version_has_one_winner(store: WeightStore) -> None:
    barrier = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def publish(name: str) -> None:
        def write(directory: Path) -> None:
            (directory / "w.bin").write_bytes(name.encode())
            barrier.wait(timeout=10)  # both have written; both race to commit

        try:
            store.publish("rm", 5, write)
            outcome[name] = "won"
        except VersionExists:
            outcome[name] = "lost"

    threads = [threading.Thread(target=publish, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcome.values()) == ["lost", "won"]
    winner = next(n for n, o in outcome.items() if o == "won")
    assert store.read_bytes("rm", 5, "w.bin") == winner.encode()
    assert store.versions("rm") == [5]


@pytest.mark.parametrize("url", ["file", "memory"])
def test_a_publisher_that_finishes_between_check_and_claim_still_wins_alone(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving CI once hit: B checks for a marker (none yet), A writes its marker and
    drops its claim, B claims. B must then see A's marker and lose, not overwrite v5."""
    store = open_weight_store(f"file://{tmp_path}/weights" if url == "file"
                              else f"memory://prefloop-{uuid.uuid4().hex}")
    store.publish("rm", 5, {"w.bin": b"a"})  # A, complete: marker written, claim dropped
    real, looks = store._marker_bytes, []

    def marker_bytes(kind: str, name: str) -> bytes | None:
        looks.append(name)
        return None if len(looks) == 1 else real(kind, name)  # B's first look: before A's marker

    monkeypatch.setattr(store, "_marker_bytes", marker_bytes)
    with pytest.raises(VersionExists, match="already exist"):
        store.publish("rm", 5, {"w.bin": b"b"})
    monkeypatch.undo()
    assert len(looks) == 2  # it looked again once it held the claim
    assert store.read_bytes("rm", 5, "w.bin") == b"a"
    assert store.versions("rm") == [5]
    store.publish("rm", 6, {"w.bin": b"c"})  # B left no claim behind to block later versions
    assert store.verify("rm", 6).files == {"w.bin": hashlib.sha256(b"c").hexdigest()}


def test_tampered_files_fail_verification(store: WeightStore, tmp_path: Path) -> None:
    store.publish("rm", 1, {"w.bin": b"good"})
    _put_raw(store, "rm", "v1", "w.bin", b"evil")
    with pytest.raises(CorruptVersion, match=r"w\.bin: sha256 differs"):
        store.verify("rm", 1)
    if isinstance(store, FsspecWeightStore):
        with pytest.raises(CorruptVersion):
            store.fetch("rm", 1, tmp_path / "dl")


def test_fetch_downloads_a_verified_copy(tmp_path: Path) -> None:
    store = FsspecWeightStore(f"memory://prefloop-{uuid.uuid4().hex}")
    store.publish("rm", 4, {"a/b.bin": b"bytes"})
    local = store.fetch("rm", 4, tmp_path / "rm-v4")
    assert (local / "a" / "b.bin").read_bytes() == b"bytes"
    assert fsspec.filesystem("memory").exists(f"{store.base}/rm/v4/{MARKER}")


@pytest.mark.parametrize(
    ("kind", "version", "message"),
    [("RM", 1, "weight kind must match"), ("rm", -1, "version must be an integer >= 0")],
)
def test_bad_names_are_refused(store: WeightStore, kind: str, version: int, message: str) -> None:
    with pytest.raises(WeightStoreError, match=message):
        store.publish(kind, version, {"w.bin": b"x"})
    with pytest.raises(WeightStoreError, match="reserved file names"):
        store.publish("rm", 1, {MARKER: b"x"})
    assert store.versions("rm") == []
