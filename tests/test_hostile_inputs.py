"""Hostile and broken checkpoints through the CLI ("Nothing lost, nobody in").

Each case damages a copy of a tiny checkpoint, runs ``hfnemo import`` (HF side) or ``hfnemo
export`` (NeMo side) and checks: exit code 2 (a ConversionError, never a traceback or a silent
success), a message naming the file (and the tensor where there is one) and a fix, no output or
staging directory left behind, the source files byte for byte unchanged, and -- for the cases that
try to run code -- that the code did not run.

All conversions run concurrently in one module fixture (each is a separate process).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import _copy, _edit_config, _patch, _truncate, hfnemo, tree_hash

PWNED = "PWNED"  # a file that hostile input tries to create next to the source


# ------------------------------------------------------------------------------ safetensors edits

def _split(p: Path) -> tuple[dict, bytes]:
    b = p.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


def _write_raw(p: Path, raw: bytes, data: bytes) -> None:
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _edit_header(p: Path, fn: Callable[[dict], None]) -> None:
    header, data = _split(p)
    fn(header)
    _write_raw(p, json.dumps(header).encode(), data)


def _tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(d: Path) -> str:
    def fn(h: dict) -> None:
        a, b = _tensors_by_offset(h)[:2]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + h[b]["data_offsets"][1]
                                - h[b]["data_offsets"][0]]
        fn.name = b
    _edit_header(d / "model.safetensors", fn)
    return fn.name


def _out_of_range(d: Path) -> str:
    def fn(h: dict) -> None:
        last = _tensors_by_offset(h)[-1]
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + 4096, e + 4096]
        fn.name = last
    _edit_header(d / "model.safetensors", fn)
    return fn.name


def _gap(d: Path) -> str:
    def fn(h: dict) -> None:
        names = _tensors_by_offset(h)
        h.pop(names[1])  # its bytes stay: a hole between names[0] and names[2]
        fn.name = names[2]
    _edit_header(d / "model.safetensors", fn)
    return fn.name


def _bad_dtype(value: object) -> Callable[[Path], str]:
    def mutate(d: Path) -> str:
        def fn(h: dict) -> None:
            h["model.norm.weight"]["dtype"] = value
        _edit_header(d / "model.safetensors", fn)
        return "model.norm.weight"
    return mutate


def _raw_header(raw: bytes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        p = d / "model.safetensors"
        header, data = _split(p)
        n = len(json.dumps(header).encode())
        _write_raw(p, raw + b" " * max(0, n - len(raw)), data)
    return mutate


def _shape_vs_config(d: Path) -> str:
    name = "model.layers.0.mlp.down_proj.weight"

    def fn(h: dict) -> None:
        h[name]["shape"] = h[name]["shape"][::-1]  # same bytes, transposed: consistent file, wrong model
    _edit_header(d / "model.safetensors", fn)
    return name


# ------------------------------------------------------------------------------ sharded edits

def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _missing_from_shard(d: Path) -> str:
    name = "model.layers.0.input_layernorm.weight"
    shard = d / _index(d)["weight_map"][name]
    ts = load_file(shard)
    ts.pop(name)
    save_file(ts, shard, metadata={"format": "pt"})
    return name


def _in_two_shards(d: Path) -> str:
    name = "model.layers.0.input_layernorm.weight"
    wm = _index(d)["weight_map"]
    other = d / wm["model.layers.0.self_attn.k_proj.weight"]
    ts = load_file(other)
    ts[name] = load_file(d / wm[name])[name]
    save_file(ts, other, metadata={"format": "pt"})
    return name


def _shard_missing(d: Path) -> str:
    shard = _index(d)["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    (d / shard).unlink()
    return shard


def _index_points(target: str) -> Callable[[Path], str]:
    def mutate(d: Path) -> str:
        idx = _index(d)
        idx["weight_map"]["model.norm.weight"] = target
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        return target
    return mutate


def _config_loop(d: Path) -> None:
    (d / "config.json").unlink()
    os.symlink("config.json", d / "config.json")


def _shard_loop(d: Path) -> str:
    shard = _index(d)["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    (d / shard).unlink()
    os.symlink(shard, d / shard)
    return shard


def _config_is_dir(d: Path) -> None:
    (d / "config.json").unlink()
    (d / "config.json").mkdir()


# ------------------------------------------------------------------------------ NeMo edits

FQN = "module.embedding.word_embeddings.weight"


def _edit_metadata(d: Path, fn: Callable[[object, Path], None]) -> None:
    mp = d / "weights" / ".metadata"
    md = pickle.loads(mp.read_bytes())  # our own file, trusted
    fn(md, d / "weights")
    mp.write_bytes(pickle.dumps(md))


def _storage_key(md: object) -> object:
    return next(k for k in md.storage_data if k.fqn == FQN and k.offset is not None)


def _chunk_outside(d: Path) -> str:
    def fn(md: object, w: Path) -> None:
        k = _storage_key(md)
        info = md.storage_data[k]
        size = (w / info.relative_path).stat().st_size
        md.storage_data[k] = type(info)(info.relative_path, size - 100, info.length)
    _edit_metadata(d, fn)
    return FQN


def _chunk_escapes(d: Path) -> str:
    def fn(md: object, w: Path) -> None:
        k = _storage_key(md)
        info = md.storage_data[k]
        md.storage_data[k] = type(info)("../context/model.yaml", 0, 10)
    _edit_metadata(d, fn)
    return FQN


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.target}",))


def _metadata_runs_code(d: Path) -> None:
    (d / "weights" / ".metadata").write_bytes(pickle.dumps(_Evil(d.parent / PWNED)))


def _distcp_runs_code(d: Path) -> str:
    buf = io.BytesIO()
    torch.save(_Evil(d.parent / PWNED), buf)
    evil = buf.getvalue()

    def fn(md: object, w: Path) -> None:
        k = _storage_key(md)
        info = md.storage_data[k]
        f = w / info.relative_path
        at = f.stat().st_size
        with open(f, "ab") as fh:
            fh.write(evil)
        md.storage_data[k] = type(info)(info.relative_path, at, len(evil))
    _edit_metadata(d, fn)
    return FQN


def _distcp_truncated(d: Path) -> str:
    f = d / "weights" / "__0_1.distcp"
    os.truncate(f, f.stat().st_size // 2)
    return "__0_1.distcp"


def _yaml_python_tag(d: Path) -> None:
    y = d / "context" / "model.yaml"
    y.write_text(f"evil: !!python/object/apply:os.system ['touch {d.parent / PWNED}']\n" + y.read_text())


def _no_context(d: Path) -> None:
    shutil.rmtree(d / "context")


# ------------------------------------------------------------------------------ the cases

# name: (source kind, mutation, words the message must hold besides the file; a mutation's return
# value, when not None, must appear too: the tensor or file it damaged)
CASES: dict[str, tuple[str, Callable[[Path], object], list[str]]] = {
    "offsets_overlap": ("hf", _overlap, ["model.safetensors", "overlaps", "tensor:"]),
    "offsets_out_of_range": ("hf", _out_of_range, ["model.safetensors", "outside", "tensor:"]),
    "offsets_gap": ("hf", _gap, ["model.safetensors", "gap", "tensor:"]),
    "header_invalid_json": ("hf", _raw_header(b'{"model.norm.weight": {"dtype": '), ["model.safetensors", "JSON"]),
    "header_not_object": ("hf", _raw_header(b'["model.norm.weight"]'), ["model.safetensors", "not a JSON object"]),
    "header_deeply_nested": ("hf", lambda d: _write_raw(d / "model.safetensors", b"[" * 200_000, b""),
                             ["model.safetensors", "JSON"]),
    "header_huge_integer": ("hf", _raw_header(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}"),
                            ["model.safetensors", "JSON"]),
    "unknown_dtype": ("hf", _bad_dtype("F9_E9M9"), ["model.safetensors", "unknown dtype", "F9_E9M9", "tensor:"]),
    "dtype_not_a_string": ("hf", _bad_dtype(["BF16"]), ["model.safetensors", "unknown dtype", "tensor:"]),
    "shape_contradicts_config": ("hf", _shape_vs_config, ["model.safetensors", "contradicts the config", "tensor:"]),
    "index_tensor_missing_from_shard": ("sharded", _missing_from_shard, ["index.json", "missing from", "tensor:"]),
    "tensor_in_two_shards": ("sharded", _in_two_shards, ["stored twice", "model-000", "tensor:"]),
    "shard_missing": ("sharded", _shard_missing, ["missing", "download every shard"]),
    "index_names_parent_dir": ("sharded", _index_points("../x.safetensors"), ["index.json", "outside"]),
    "index_names_absolute_path": ("sharded", _index_points("/etc/passwd"), ["index.json", "outside"]),
    "index_names_non_string": ("sharded", _index_points(7), ["index.json", "not a string", "tensor:"]),
    "config_symlink_loop": ("hf", _config_loop, ["config.json", "symbolic links"]),
    "config_is_a_directory": ("hf", _config_is_dir, ["config.json", "directory"]),
    "shard_symlink_loop": ("sharded", _shard_loop, ["symbolic link", "loops"]),
    "metadata_chunk_outside_file": ("nemo", _chunk_outside, ["__0_", "outside", "tensor:"]),
    "metadata_chunk_escapes_dir": ("nemo", _chunk_escapes, [".metadata", "outside the checkpoint", "tensor:"]),
    "metadata_runs_code": ("nemo", _metadata_runs_code, [".metadata", "system", "refusing"]),
    "distcp_data_pkl_runs_code": ("nemo", _distcp_runs_code, ["__0_", "system", "tensor:"]),
    "distcp_truncated": ("nemo", _distcp_truncated, ["outside", "tensor:"]),
    "model_yaml_python_tag": ("nemo", _yaml_python_tag, ["model.yaml", "python/object"]),
    "no_context_dir": ("nemo", _no_context, ["neither model.yaml nor io.json", "context/"]),
}


@pytest.fixture(scope="module")
def sources(tiny_hf_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    hf = tiny_hf_factory("llama3_gqa")
    sharded = tiny_hf_factory("llama3_gqa", max_shard_size="20KB")
    nemo = tmp_path_factory.mktemp("hostile_src") / "nemo"
    r = hfnemo("import", str(hf), str(nemo), "--quiet")
    assert r.returncode == 0, r.stderr
    return {"hf": hf, "sharded": sharded, "nemo": nemo}


@pytest.fixture(scope="module")
def results(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Prepare every case, then run all conversions at once."""
    prepared = {}
    for case, (kind, mutate, _) in CASES.items():
        root = tmp_path_factory.mktemp("case")  # a neutral name: words must come from the message
        src = _copy(sources[kind], root / "src")
        named = mutate(src)
        prepared[case] = (root, src, named, tree_hash(src))
    verb = {"hf": "import", "sharded": "import", "nemo": "export"}

    def run(case: str):
        root, src, _, _ = prepared[case]
        return hfnemo(verb[CASES[case][0]], str(src), str(root / "out"))

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        done = dict(zip(CASES, pool.map(run, CASES)))
    return {case: (*prepared[case], done[case]) for case in CASES}


def test_at_least_16_new_cases() -> None:
    from test_cli import BAD_INPUTS

    assert len(set(CASES) - set(BAD_INPUTS)) >= 16


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_exit_2_named_fixed_nothing_written(results: dict, case: str) -> None:
    root, src, named, before, r = results[case]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr
    assert "Traceback" not in err and "hfnemo: error:" in err
    assert "  file:   " in err and "  fix:    " in err, err  # names a file and a fix
    for w in CASES[case][2] + ([str(named)] if named is not None else []):
        assert w in err, (w, err)
    assert not (root / "out").exists()
    assert not any(p.name.startswith(".out") for p in root.iterdir()), list(root.iterdir())
    assert tree_hash(src) == before  # the source is read, never written
    assert not (root / PWNED).exists()  # hostile input ran no code
