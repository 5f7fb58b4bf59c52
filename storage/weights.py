"""Versioned, immutable weight store: a version is visible only once it is complete.

Layout: ``<root>/<kind>/v<version>/`` holds the files and a ``COMPLETE`` marker (JSON with the
sha256 of every file). Readers (``versions``, ``latest``, ``get``) only see directories that
carry the marker, so a half-written or abandoned version is invisible.

* ``LocalWeightStore`` (a plain directory, e.g. shared NFS): files and marker are written into
  ``<kind>/.tmp-v<version>-*`` and then renamed to ``v<version>`` in one atomic ``rename(2)``,
  which also fails if the version exists, so of two concurrent publishers exactly one wins.
* ``FsspecWeightStore`` (any fsspec URL: ``s3://``, ``gs://``, ``file://``, ``memory://``):
  object stores have no atomic directory rename, so the version is claimed by exclusively
  creating ``v<version>/.publishing``, files are uploaded, and the marker is written last (via a
  temporary name then ``mv``); the marker is the commit point.

No torch here: a publisher hands a callback that writes into a local directory, e.g.
``store.publish("rm", 3, lambda d: model.save_pretrained(d))``, or a ``{name: bytes}`` mapping,
or an existing directory to copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

from storage.errors import CorruptVersion, VersionExists, VersionNotFound, WeightStoreError
from storage.models import utcnow

MARKER = "COMPLETE"
CLAIM = ".publishing"
_KIND = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_VERSION_DIR = re.compile(r"v(\d+)")
_CHUNK = 1 << 20
_CLAIM_LOCK = threading.Lock()  # makes exclusive create atomic for in-process fs (memory://)

Source = Callable[[Path], Any] | Mapping[str, bytes] | Path


@dataclass(frozen=True)
class WeightVersion:
    """A complete, immutable weight version.

    Attributes:
        kind: e.g. ``rm`` or ``policy``.
        version: the integer version.
        uri: where the version directory lives (a local path or an fsspec URL).
        files: relative path -> sha256 hex, from the completion marker.
        created_at: ISO-8601 UTC time of publication.
    """

    kind: str
    version: int
    uri: str
    files: Mapping[str, str]
    created_at: str


def _check(kind: str, version: int) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise WeightStoreError(f"weight kind must match {_KIND.pattern}; got {kind!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise WeightStoreError(f"weight version must be an integer >= 0; got {version!r}")
    return f"v{version}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise WeightStoreError(f"publish: {path} is a symlink; write real files")
        if path.is_file():
            yield path.relative_to(root).as_posix(), path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage(source: Source, directory: Path) -> dict[str, str]:
    """Write ``source`` into ``directory`` (fsynced) and return {relative path: sha256}."""
    if isinstance(source, Path):
        shutil.copytree(source, directory, dirs_exist_ok=True)
    elif isinstance(source, Mapping):
        for name, data in source.items():
            target = directory / name
            if not target.resolve().is_relative_to(directory.resolve()):
                raise WeightStoreError(f"publish: file name {name!r} escapes the version")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    else:
        source(directory)
    files = {}
    for rel, path in _walk(directory):
        _fsync(path)
        files[rel] = _sha256_file(path)
    if MARKER in files or CLAIM in files:
        raise WeightStoreError(f"publish: {MARKER!r} and {CLAIM!r} are reserved file names")
    return files


def _marker(kind: str, version: int, files: Mapping[str, str]) -> bytes:
    body = {"kind": kind, "version": version, "files": dict(files), "created_at": _now_iso()}
    return json.dumps(body, sort_keys=True, indent=1).encode("utf-8")


def _now_iso() -> str:
    return utcnow().isoformat() + "Z"


def _parse_marker(raw: bytes, uri: str) -> WeightVersion:
    try:
        body = json.loads(raw)
        return WeightVersion(
            body["kind"], int(body["version"]), uri, dict(body["files"]), body["created_at"]
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptVersion(f"{uri}/{MARKER} is not a valid completion marker: {exc}") from exc


class WeightStore(ABC):
    """Shared reader logic; backends implement publishing, listing and marker reads."""

    @abstractmethod
    def publish(self, kind: str, version: int, source: Source) -> WeightVersion:
        """Publish a new immutable version (``VersionExists`` if it is already there)."""

    @abstractmethod
    def _marker_bytes(self, kind: str, name: str) -> bytes | None:
        """The completion marker of ``<kind>/<name>``, or None when incomplete."""

    @abstractmethod
    def _listing(self, kind: str) -> list[str]:
        """Entry names under ``<kind>/``."""

    @abstractmethod
    def _uri(self, kind: str, name: str) -> str:
        """Where ``<kind>/<name>`` lives."""

    @abstractmethod
    def _open(self, kind: str, name: str, rel: str) -> BinaryIO:
        """Open a file of a version for reading."""

    def read_bytes(self, kind: str, version: int, rel: str) -> bytes:
        """One file of a complete version."""
        found = self.get(kind, version)
        if rel not in found.files:
            raise VersionNotFound(f"{found.uri}: no file {rel!r} (files: {sorted(found.files)})")
        with self._open(kind, f"v{version}", rel) as handle:
            return handle.read()

    def verify(self, kind: str, version: int) -> WeightVersion:
        """Re-hash every file against the marker (``CorruptVersion`` on a mismatch)."""
        found = self.get(kind, version)
        for rel, expected in found.files.items():
            digest = hashlib.sha256()
            with self._open(kind, f"v{version}", rel) as handle:
                while block := handle.read(_CHUNK):
                    digest.update(block)
            if digest.hexdigest() != expected:
                raise CorruptVersion(f"{found.uri}/{rel}: sha256 differs from the marker")
        return found

    def versions(self, kind: str) -> list[int]:
        """Complete versions of ``kind``, ascending (directories without a marker are skipped)."""
        _check(kind, 0)
        found = []
        for name in self._listing(kind):
            match = _VERSION_DIR.fullmatch(name)
            if match and self._marker_bytes(kind, name) is not None:
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self, kind: str) -> WeightVersion | None:
        """The highest complete version of ``kind``, or None."""
        complete = self.versions(kind)
        return self.get(kind, complete[-1]) if complete else None

    def get(self, kind: str, version: int) -> WeightVersion:
        """A complete version (``VersionNotFound`` if absent or incomplete)."""
        name = _check(kind, version)
        raw = self._marker_bytes(kind, name)
        if raw is None:
            raise VersionNotFound(
                f"weights {kind} v{version}: no complete version at {self._uri(kind, name)} "
                f"(complete versions: {self.versions(kind)})"
            )
        return _parse_marker(raw, self._uri(kind, name))


class LocalWeightStore(WeightStore):
    """Weight store in a local (or NFS-mounted) directory; publish is one atomic rename."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _uri(self, kind: str, name: str) -> str:
        return str(self.root / kind / name)

    def _listing(self, kind: str) -> list[str]:
        directory = self.root / kind
        return [p.name for p in directory.iterdir()] if directory.is_dir() else []

    def _marker_bytes(self, kind: str, name: str) -> bytes | None:
        marker = self.root / kind / name / MARKER
        return marker.read_bytes() if marker.is_file() else None

    def publish(self, kind: str, version: int, source: Source) -> WeightVersion:
        """Stage into ``.tmp-v<version>-*`` with the marker, then ``rename`` into place."""
        name = _check(kind, version)
        kind_dir = self.root / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        final = kind_dir / name
        if final.exists():
            raise VersionExists(f"weights {kind} v{version} already exist at {final}")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=kind_dir))
        try:
            files = stage(source, tmp)
            (tmp / MARKER).write_bytes(_marker(kind, version, files))
            _fsync(tmp / MARKER)
            try:
                os.rename(tmp, final)  # atomic; fails when final exists and is not empty
            except OSError as exc:
                raise VersionExists(f"weights {kind} v{version} already exist at {final}") from exc
            _fsync(kind_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(kind, version)

    def _open(self, kind: str, name: str, rel: str) -> BinaryIO:
        return (self.root / kind / name / rel).open("rb")

    def path(self, kind: str, version: int) -> Path:
        """Local directory of a complete version (load weights straight from it)."""
        return Path(self.get(kind, version).uri)


class FsspecWeightStore(WeightStore):
    """Weight store on any fsspec URL; the completion marker, written last, commits a version."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **storage_options)

    def _path(self, kind: str, name: str, *rest: str) -> str:
        return "/".join([self.base.rstrip("/"), kind, name, *rest])

    def _uri(self, kind: str, name: str) -> str:
        return f"{self.url}/{kind}/{name}"

    def _listing(self, kind: str) -> list[str]:
        directory = f"{self.base.rstrip('/')}/{kind}"
        if not self.fs.isdir(directory):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False)]

    def _open(self, kind: str, name: str, rel: str) -> BinaryIO:
        return self.fs.open(self._path(kind, name, rel), "rb")

    def _marker_bytes(self, kind: str, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(kind, name, MARKER))
        except FileNotFoundError:
            return None

    def _claim(self, kind: str, name: str, version: int) -> None:
        with _CLAIM_LOCK:
            if self._marker_bytes(kind, name) is not None:
                raise VersionExists(
                    f"weights {kind} v{version} already exist at {self._uri(kind, name)}"
                )
            try:
                self.fs.makedirs(self._path(kind, name), exist_ok=True)
                with self.fs.open(self._path(kind, name, CLAIM), "xb") as handle:
                    handle.write(uuid.uuid4().hex.encode())
            except FileExistsError as exc:
                raise VersionExists(
                    f"weights {kind} v{version} are being published (or a publisher died: "
                    f"remove {self._uri(kind, name)}/{CLAIM} after checking)"
                ) from exc
            # A publisher that finished between the marker check above and our claim wrote its
            # marker before it dropped its claim: look again, now that we hold the claim.
            if self._marker_bytes(kind, name) is not None:
                self.fs.rm_file(self._path(kind, name, CLAIM))
                raise VersionExists(
                    f"weights {kind} v{version} already exist at {self._uri(kind, name)}"
                )

    def publish(self, kind: str, version: int, source: Source) -> WeightVersion:
        """Stage locally, claim the version, upload, then write the marker last."""
        name = _check(kind, version)
        with tempfile.TemporaryDirectory(prefix=f"prefloop-{kind}-{name}-") as local:
            files = stage(source, Path(local))
            self._claim(kind, name, version)
            try:
                for rel in files:
                    remote = self._path(kind, name, rel)
                    self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
                    self.fs.put_file(str(Path(local) / rel), remote)
                tmp_marker = self._path(kind, name, f"{MARKER}.tmp-{uuid.uuid4().hex}")
                self.fs.pipe_file(tmp_marker, _marker(kind, version, files))
                self.fs.mv(tmp_marker, self._path(kind, name, MARKER))
                self.fs.rm_file(self._path(kind, name, CLAIM))
            except BaseException:
                self.fs.rm(self._path(kind, name), recursive=True)
                raise
        return self.get(kind, version)

    def fetch(self, kind: str, version: int, dest: Path) -> Path:
        """Download a complete version into ``dest`` and check every sha256; returns ``dest``."""
        found = self.get(kind, version)
        for rel, expected in found.files.items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(kind, f"v{version}", rel), str(target))
            if _sha256_file(target) != expected:
                raise CorruptVersion(f"{found.uri}/{rel}: sha256 differs from the marker")
        return dest


def open_weight_store(location: str | Path, **storage_options: Any) -> WeightStore:
    """A store for a local path, or for an fsspec URL (anything with ``://``)."""
    if isinstance(location, str) and "://" in location:
        return FsspecWeightStore(location, **storage_options)
    return LocalWeightStore(Path(location))
