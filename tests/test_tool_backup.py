"""hfnemo backup: a verified copy (checksums of source and copy compared, staged then renamed, never
overwriting); a copy that reads back wrong or a source that changes while copied is refused and
leaves nothing behind."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import hfnemo
from hfnemo.cli import main
from hfnemo.errors import OutputExists, UsageError
from hfnemo.tools import backup as tool


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def nemo(tiny_hf_factory, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("backup") / "llama-nemo"
    hfnemo.convert(tiny_hf_factory("llama3_gqa"), out, tp=2)
    return out


def test_backup_directory(nemo: Path, tmp_path: Path, capsys) -> None:
    rc, out, err = run(capsys, "backup", str(nemo), "--name", "copy1", "--to", str(tmp_path / "bk"), "--json")
    assert rc == 0, err
    r = json.loads(out)
    dst = tmp_path / "bk" / "copy1"
    assert r["backup"] == str(dst) and r["files"] == len(tree(nemo)) and r["bytes"] > 0
    assert set(r["checksums"]) == set(tree(nemo)) and r["algorithm"] in ("xxh3_128", "blake2b")
    assert tree(dst) == tree(nemo)
    assert os.listdir(tmp_path / "bk") == ["copy1"]  # no staging left
    assert "read back" in err
    assert hfnemo.verify(nemo, dst).equal
    # never overwrites: the same name again is refused, the copy untouched
    rc, _, err = run(capsys, "backup", str(nemo), "--name", "copy1", "--to", str(tmp_path / "bk"))
    assert rc == 2 and "never overwrites" in err
    assert tree(dst) == tree(nemo)


def test_backup_default_name_and_file(nemo: Path, tmp_path: Path) -> None:
    import tarfile

    src = tmp_path / "m" / "model.nemo"
    src.parent.mkdir()
    with tarfile.open(src, "w:") as tf:
        tf.add(nemo, arcname=".")
    r = hfnemo.backup(src)
    dst = Path(r.backup)
    assert dst.parent == src.parent and dst.name.startswith("model.nemo.backup-")
    assert dst.read_bytes() == src.read_bytes() and r.files == 1
    assert sorted(os.listdir(src.parent)) == sorted(["model.nemo", dst.name])


def test_backup_follows_links(tmp_path: Path) -> None:
    """An HF cache snapshot: files are links into blobs/; the backup holds the bytes."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc").write_bytes(b"x" * 100_000)
    snap = tmp_path / "snap"
    (snap / "sub").mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blobs / "abc")
    (snap / "sub" / "config.json").write_text("{}")
    r = hfnemo.backup(snap, to=tmp_path / "out", name="s")
    dst = tmp_path / "out" / "s"
    assert not (dst / "model.safetensors").is_symlink()
    assert tree(dst) == tree(snap) and r.bytes == 100_002


def test_copy_that_reads_back_wrong_is_refused(nemo: Path, tmp_path: Path, monkeypatch) -> None:
    real = tool._copy_one

    def corrupting(src: Path, dst: Path, buf, new_hash) -> str:
        digest = real(src, dst, buf, new_hash)
        if dst.name == "__0_1.distcp":  # the disk "returns" one flipped bit
            with open(dst, "r+b") as f:
                f.seek(1000)
                b = f.read(1)[0]
                f.seek(1000)
                f.write(bytes([b ^ 4]))
        return digest

    monkeypatch.setattr(tool, "_copy_one", corrupting)
    with pytest.raises(tool.BackupMismatch, match=r"weights/__0_1.distcp reads back differently"):
        hfnemo.backup(nemo, to=tmp_path, name="bad")
    assert os.listdir(tmp_path) == []


def test_source_changing_during_copy_is_refused(nemo: Path, tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 * tool.BUF_BYTES // 2))
    real_readv = os.readv
    calls = {"n": 0}

    def readv(fd, bufs):
        n = real_readv(fd, bufs)
        calls["n"] += 1
        if calls["n"] == 1:  # a writer appends while the first buffer is copied
            with open(src / "a.bin", "ab") as f:
                f.write(b"more")
        return n

    monkeypatch.setattr(tool.os, "readv", readv)
    with pytest.raises(tool.BackupMismatch, match="changed while it was being copied"):
        hfnemo.backup(src, to=tmp_path / "out", name="x")
    assert os.listdir(tmp_path / "out") == []


def test_bad_arguments(nemo: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = run(capsys, "backup", str(tmp_path / "missing"))
    assert rc == 2 and "does not exist" in err
    rc, _, err = run(capsys, "backup", str(nemo), "--to", str(nemo / "weights"))
    assert rc == 2 and "inside the source" in err
    with pytest.raises(UsageError, match="plain file name"):
        hfnemo.backup(nemo, name="../x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExists):
        hfnemo.backup(nemo, to=tmp_path, name="taken")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        hfnemo.backup(nemo, to=tmp_path / "file")


def test_rename_never_replaces(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()  # an empty directory, which plain rename(2) would replace
    with pytest.raises(OutputExists):
        tool._rename_noreplace(a, b)
    assert a.is_dir() and b.is_dir()
