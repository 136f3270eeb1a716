"""Plan objects: frozen, JSON-serialisable data describing every byte the executor moves.

A plan is a list of output items. Each item (a DCP chunk or an HF tensor) is a row-major block of
rows; its bytes are produced row block by row block from *segments*: runs of consecutive rows of
one source tensor (or zero fill). QKV interleave, gate/up fusion, layer stacking, TP slicing and
their inverses are all row gathers, so one executor serves every rule.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


def json_default(obj: object) -> object:
    """Config values that are Python references (PyRef: activation functions, dtypes) print as
    their dotted target, as model.yaml spells them."""
    return getattr(obj, "target", None) or str(obj)


@dataclass(frozen=True)
class Segment:
    """Output rows ``[out_row, out_row+rows)`` come from ``source`` rows ``[src_row, src_row+rows)``."""

    out_row: int
    rows: int
    source: str | None  # logical source tensor name; None means zero fill (vocab padding)
    src_row: int = 0
    # Column window of each source row, in elements of the row (0 cols: the whole row). Row-parallel
    # tensor-parallel shards (linear_proj, linear_fc2) cut columns out of full source rows.
    col: int = 0
    cols: int = 0


@dataclass(frozen=True)
class SourceTensor:
    """A logical source tensor: an HF tensor, or one layer's slice of a stacked DCP tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    # HF: ("safetensors", file, absolute_offset). NeMo: ("dcp", fqn, prefix) where prefix indexes
    # the leading stacked axes (layer[, expert]) of the global tensor.
    location: tuple[object, ...]

    @property
    def nbytes(self) -> int:
        from hfnemo.dtypes import BY_NAME

        n = BY_NAME[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class OutputItem:
    """One unit of output: an HF tensor in a shard, or one chunk of a DCP global tensor."""

    key: str  # HF tensor name or DCP fqn (with prefix)
    shape: tuple[int, ...]  # shape as stored (a stacked DCP chunk has leading 1s)
    dtype: str
    rows: int  # number of rows the segments tile (shape without leading stacked axes)
    row_elems: int  # elements per row
    segments: tuple[Segment, ...]
    transform: str  # human label: copy, qkv_interleave, qkv_split, gate_up_split, ...
    file: str  # output file (relative)
    offsets: tuple[int, ...] = ()  # DCP chunk global offsets
    global_shape: tuple[int, ...] = ()  # DCP global tensor shape

    @property
    def nbytes(self) -> int:
        from hfnemo.dtypes import BY_NAME

        return self.rows * self.row_elems * BY_NAME[self.dtype].itemsize


@dataclass(frozen=True)
class BytesItem:
    """A raw byte blob in a DCP file (Transformer Engine ``_extra_state``)."""

    key: str
    payload_hex: str
    file: str


@dataclass(frozen=True)
class Plan:
    direction: str  # "hf_to_nemo" | "nemo_to_hf"
    arch: str
    source: str
    dtype: str  # output dtype policy actually applied ("auto" resolved per tensor)
    sources: tuple[SourceTensor, ...]
    items: tuple[OutputItem, ...]
    byte_items: tuple[BytesItem, ...]
    files: tuple[str, ...]  # output data files in write order
    config: dict = field(default_factory=dict)  # target config (HF config.json or NeMo model config)
    layout: dict = field(default_factory=dict)  # parallel layout written: {"tp": 1, "pp": 1, "ep": 1}
    budget: dict = field(default_factory=dict)  # memory budget arithmetic
    notes: tuple[str, ...] = ()

    @property
    def read_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)

    @property
    def write_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False, default=json_default)
