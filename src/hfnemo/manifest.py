"""The completeness manifest: ``hfnemo-manifest.json`` at the root of every output hfnemo writes.

It is the last file written before the output is published (docs/formats.md, "Staging, journal
and manifest"): every other file's relative path, size and xxh3_64, so that a copy, a backup or a
half-synced directory can be checked without knowing the format. Hashes of the tensor files are
computed while they stream out (no second read of the output); small side files are read once.

Shape (JSON, keys sorted, UTF-8, one trailing newline)::

    {"hfnemo_manifest": 1, "hash": "xxh3_64", "plan_sha256": "<hex>", "direction": "hf_to_nemo",
     "arch": "llama", "total_bytes": 123, "files": [{"path": "weights/__0_0.distcp", "size": 123,
     "xxh3_64": "<16 hex digits>"}, ...]}

``files`` is sorted by path (``/``-separated, relative to the output root) and lists every
regular file of the output except the manifest itself.

Example:
    >>> from hfnemo.manifest import check_manifest
    >>> problems = check_manifest("llama3-nemo")      # [] when every byte is there
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import xxhash

MANIFEST = "hfnemo-manifest.json"
VERSION = 1
HASH = "xxh3_64"
_READ = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, "/"-separated
    size: int
    xxh3_64: str  # 16 lowercase hex digits


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileEntry]
    meta: dict[str, Any] = field(default_factory=dict)  # plan_sha256, direction, arch, total_bytes

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


class ManifestError(Exception):
    """The manifest is missing or not a manifest this version understands."""


def hexdigest(h: "xxhash.xxh3_64") -> str:
    return f"{h.intdigest():016x}"


def hash_file(path: str | Path, limit: int | None = None) -> tuple[int, "xxhash.xxh3_64"]:
    """Hash the first ``limit`` bytes (all when None) of a file; returns (bytes hashed, hasher).

    The hasher is returned, not its digest, so that a writer can go on appending (resume)."""
    h = xxhash.xxh3_64()
    done = 0
    buf = bytearray(_READ)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while limit is None or done < limit:
            want = _READ if limit is None else min(_READ, limit - done)
            n = f.readinto(view[:want])
            if not n:
                break
            h.update(view[:n])
            done += n
    return done, h


def walk_files(root: str | Path, skip: tuple[str, ...] = (MANIFEST,)) -> Iterator[str]:
    """Every regular file under ``root`` as a sorted relative "/" path (symlinks are not followed)."""
    root = Path(root)
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            rel = Path(d, name).relative_to(root).as_posix()
            if rel not in skip:
                out.append(rel)
    yield from sorted(out)


def write_manifest(root: str | Path, entries: dict[str, tuple[int, str]], meta: dict[str, Any]) -> Path:
    """Write and fsync ``root/hfnemo-manifest.json`` for ``entries`` {relpath: (size, hex)}."""
    doc = {"hfnemo_manifest": VERSION, "hash": HASH, **meta,
           "files": [{"path": p, "size": s, HASH: h} for p, (s, h) in sorted(entries.items())]}
    path = Path(root) / MANIFEST
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_manifest(root: str | Path) -> Manifest:
    """Parse ``root/hfnemo-manifest.json`` (``root`` may also be the manifest file itself)."""
    path = Path(root)
    if path.is_dir():
        path = path / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ManifestError(f"{path} does not exist") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("hfnemo_manifest") != VERSION or doc.get("hash") != HASH:
        raise ManifestError(f"{path} is not an hfnemo manifest version {VERSION} ({HASH})")
    files = {}
    for e in doc.get("files") or []:
        ok = (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("size"), int)
              and isinstance(e.get(HASH), str))
        p = Path(e["path"]) if ok else None
        if not ok or p.is_absolute() or ".." in p.parts:
            raise ManifestError(f"{path}: malformed file entry {e!r}")
        files[e["path"]] = FileEntry(e["path"], e["size"], e[HASH])
    meta = {k: v for k, v in doc.items() if k not in ("files", "hfnemo_manifest", "hash")}
    return Manifest(files, meta)


def check_manifest(root: str | Path, *, hashes: bool = True, extra: bool = True,
                   skip: tuple[str, ...] = ()) -> list[str]:
    """Problems of an output against its manifest, one readable line each; [] when it is complete.

    Args:
        root: the output directory.
        hashes: re-read every file and compare its xxh3_64 (False: sizes only, instant).
        extra: report files present but not listed.
        skip: relative paths to ignore (besides the manifest itself).
    """
    root = Path(root)
    try:
        man = read_manifest(root)
    except ManifestError as e:
        return [str(e)]
    problems = []
    for rel, ent in man.files.items():
        p = root / rel
        try:
            size = p.stat().st_size if p.is_file() and not p.is_symlink() else None
        except OSError:
            size = None
        if size is None:
            problems.append(f"{rel}: missing")
        elif size != ent.size:
            problems.append(f"{rel}: {size} bytes, the manifest says {ent.size}")
        elif hashes:
            try:
                _, h = hash_file(p)
            except OSError as e:
                problems.append(f"{rel}: unreadable ({e.strerror})")
                continue
            if hexdigest(h) != ent.xxh3_64:
                problems.append(f"{rel}: content differs from the manifest ({HASH} {hexdigest(h)}, "
                                f"expected {ent.xxh3_64})")
    if extra:
        for rel in walk_files(root, skip=(MANIFEST, *skip)):
            if rel not in man.files:
                problems.append(f"{rel}: not in the manifest")
    return problems


__all__ = ["MANIFEST", "FileEntry", "Manifest", "ManifestError", "read_manifest", "check_manifest",
           "write_manifest", "hash_file", "walk_files"]
