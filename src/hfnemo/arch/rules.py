"""Invertible mapping rules: the vocabulary architecture files are written in.

Every rule maps HF tensors to NeMo (Megatron-Core) tensors and back. Names carry ``{l}`` for the
layer index; the spec expands them. A rule never touches bytes: it returns :class:`Logical`
outputs whose rows are :class:`~hfnemo.plan.plan.Segment` gathers of source rows, which the
planner lays out and the executor streams. Shapes are checked here against the model dims, so a
wrong config or a wrong tensor is reported before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from hfnemo.errors import ShapeMismatch
from hfnemo.plan.plan import Segment, SourceTensor


@dataclass(frozen=True)
class Dims:
    """Model sizes both sides agree on; built from config.json or from model.yaml."""

    num_layers: int
    hidden: int
    heads: int
    groups: int  # query groups = key/value heads
    head_dim: int  # kv_channels
    ffn: int
    vocab: int
    tied: bool
    experts: int = 0  # MoE experts per layer (0: dense)
    vocab_padded: int = 0  # embedding rows on the NeMo side when padded (0: no padding)

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups

    @property
    def nemo_vocab(self) -> int:
        return self.vocab_padded or self.vocab


@dataclass(frozen=True)
class ParallelDims(Dims):
    """Dims plus what selects tensors in the parallel-block families (Falcon, GPT-NeoX, Phi-2):
    which norms a layer has, and linear biases. (From falcon.py.)"""

    norms: str = "shared"  # "shared": one input norm; "two": attention + MLP norms; "sequential"; "fused"
    bias: bool = True


def with_layout(base: Dims, norms: str, bias: bool) -> ParallelDims:
    return ParallelDims(**{f.name: getattr(base, f.name) for f in fields(base)}, norms=norms, bias=bias)


# Transformer Engine modules of one layer that carry _extra_state, in state-dict order (ArchSpec's
# extra_state). Dense: the Llama spec's five (NVIDIA's Llama/Qwen2/Gemma/Phi-3 checkpoints); a MoE
# layer (Mixtral) has the attention three, its experts' linears go to expert_extra_state.
ATTENTION_TE_MODULES = ("self_attention.core_attention", "self_attention.linear_proj", "self_attention.linear_qkv")
DENSE_TE_MODULES = ATTENTION_TE_MODULES + ("mlp.linear_fc1", "mlp.linear_fc2")


@dataclass(frozen=True)
class Logical:
    """A target tensor as a row gather of source tensors."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    segments: tuple[Segment, ...]
    transform: str
    row_splits: tuple[int, ...] = ()  # rows at which Megatron stores separate chunks (GLU halves)


# Symbolic sizes rules declare, resolved against Dims.
def _size(dims: Dims, sym: str | int) -> int:
    if isinstance(sym, int):
        return sym
    return {
        "V": dims.vocab, "Vp": dims.nemo_vocab, "H": dims.hidden, "E": dims.experts, "F": dims.ffn, "2F": 2 * dims.ffn,
        "Q": dims.heads * dims.head_dim, "KV": dims.groups * dims.head_dim,
        "QKV": (dims.heads + 2 * dims.groups) * dims.head_dim,
    }[sym]


def _rows(t: SourceTensor) -> int:
    return t.shape[0] if t.shape else 1


def _need(src: Mapping[str, SourceTensor], name: str) -> SourceTensor:
    return src[name]  # presence was checked by the planner before rules run


def _check(t: SourceTensor, expected: tuple[int, ...], why: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ShapeMismatch(
            f"shape {list(t.shape)} contradicts the config, which implies {list(expected)} ({why})",
            file=str(t.location[1]) if t.location else None, tensor=t.name,
            fix="check that config.json belongs to these weights (hidden_size, heads, kv heads, head_dim, "
                "intermediate_size, vocab_size)")


def _same_dtype(parts: list[SourceTensor]) -> str:
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise ShapeMismatch(f"tensors fused together have different dtypes {sorted(dtypes)}",
                            tensor=", ".join(p.name for p in parts),
                            fix="convert the checkpoint to one dtype first, or pass --dtype")
    return dtypes.pop()


class Rule:
    """Base: subclasses state their HF and NeMo names and both directions."""

    def hf_names(self, dims: Dims) -> tuple[str, ...]:
        raise NotImplementedError

    def nemo_names(self, dims: Dims) -> tuple[str, ...]:
        raise NotImplementedError

    def hf_to_nemo(self, dims: Dims, src: Mapping[str, SourceTensor], fmt: Mapping[str, object]) -> list[Logical]:
        raise NotImplementedError

    def nemo_to_hf(self, dims: Dims, src: Mapping[str, SourceTensor], fmt: Mapping[str, object]) -> list[Logical]:
        raise NotImplementedError

    @property
    def per_layer(self) -> bool:
        return any("{l}" in n for n in self._all_names())

    @property
    def per_expert(self) -> bool:
        return any("{e}" in n for n in self._all_names())

    def _all_names(self) -> tuple[str, ...]:
        return tuple(v for v in vars(self).values() if isinstance(v, str))


@dataclass(frozen=True)
class Rename(Rule):
    """Same bytes, new name. ``shape`` is the expected shape in symbols (checked both ways)."""

    hf: str
    nemo: str
    shape: tuple[str | int, ...]

    def hf_names(self, dims: Dims) -> tuple[str, ...]:
        return (self.hf,)

    def nemo_names(self, dims: Dims) -> tuple[str, ...]:
        return (self.nemo,)

    def _move(self, dims: Dims, t: SourceTensor, out: str) -> list[Logical]:
        _check(t, tuple(_size(dims, s) for s in self.shape), "renamed tensor")
        return [Logical(out, t.shape, t.dtype, (Segment(0, _rows(t), t.name, 0),), "copy")]

    def hf_to_nemo(self, dims, src, fmt):
        return self._move(dims, _need(src, self.hf.format(**fmt)), self.nemo.format(**fmt))

    def nemo_to_hf(self, dims, src, fmt):
        return self._move(dims, _need(src, self.nemo.format(**fmt)), self.hf.format(**fmt))


@dataclass(frozen=True)
class FuseQKV(Rule):
    """Separate q/k/v (weights ``[n*d, H]`` or biases ``[n*d]``) ⇄ Megatron's fused linear_qkv.

    Megatron interleaves per query group: for each group g, the group's ``heads/groups`` query
    heads, then its key head, then its value head (spec §4.1). ``trailing`` is ("H",) for weights
    and () for biases.
    """

    q: str
    k: str
    v: str
    nemo: str
    trailing: tuple[str | int, ...] = ("H",)

    def hf_names(self, dims):
        return (self.q, self.k, self.v)

    def nemo_names(self, dims):
        return (self.nemo,)

    def hf_to_nemo(self, dims, src, fmt):
        q, k, v = (_need(src, n.format(**fmt)) for n in (self.q, self.k, self.v))
        tail = tuple(_size(dims, s) for s in self.trailing)
        _check(q, (_size(dims, "Q"), *tail), "query heads x head_dim")
        _check(k, (_size(dims, "KV"), *tail), "kv heads x head_dim")
        _check(v, (_size(dims, "KV"), *tail), "kv heads x head_dim")
        d, hpg = dims.head_dim, dims.heads_per_group
        segs: list[Segment] = []
        row = 0
        for g in range(dims.groups):
            for t, start, n in ((q, g * hpg * d, hpg * d), (k, g * d, d), (v, g * d, d)):
                segs.append(Segment(row, n, t.name, start))
                row += n
        return [Logical(self.nemo.format(**fmt), (row, *tail), _same_dtype([q, k, v]), tuple(segs),
                        "qkv_interleave")]

    def nemo_to_hf(self, dims, src, fmt):
        qkv = _need(src, self.nemo.format(**fmt))
        tail = tuple(_size(dims, s) for s in self.trailing)
        _check(qkv, (_size(dims, "QKV"), *tail), "(heads + 2 x kv heads) x head_dim")
        d, hpg = dims.head_dim, dims.heads_per_group
        group = (hpg + 2) * d
        q = tuple(Segment(g * hpg * d, hpg * d, qkv.name, g * group) for g in range(dims.groups))
        k = tuple(Segment(g * d, d, qkv.name, g * group + hpg * d) for g in range(dims.groups))
        v = tuple(Segment(g * d, d, qkv.name, g * group + (hpg + 1) * d) for g in range(dims.groups))
        return [
            Logical(self.q.format(**fmt), (_size(dims, "Q"), *tail), qkv.dtype, q, "qkv_split"),
            Logical(self.k.format(**fmt), (_size(dims, "KV"), *tail), qkv.dtype, k, "qkv_split"),
            Logical(self.v.format(**fmt), (_size(dims, "KV"), *tail), qkv.dtype, v, "qkv_split"),
        ]


@dataclass(frozen=True)
class FuseGateUp(Rule):
    """gate ``[F, H]`` and up ``[F, H]`` ⇄ linear_fc1 ``[2F, H]`` = cat(gate, up).

    Megatron stores the halves as two chunks per layer (spec §3.3), hence ``row_splits``.
    """

    gate: str
    up: str
    nemo: str
    trailing: tuple[str | int, ...] = ("H",)

    def hf_names(self, dims):
        return (self.gate, self.up)

    def nemo_names(self, dims):
        return (self.nemo,)

    def hf_to_nemo(self, dims, src, fmt):
        gate, up = (_need(src, n.format(**fmt)) for n in (self.gate, self.up))
        tail = tuple(_size(dims, s) for s in self.trailing)
        _check(gate, (dims.ffn, *tail), "intermediate_size")
        _check(up, (dims.ffn, *tail), "intermediate_size")
        segs = (Segment(0, dims.ffn, gate.name, 0), Segment(dims.ffn, dims.ffn, up.name, 0))
        return [Logical(self.nemo.format(**fmt), (2 * dims.ffn, *tail), _same_dtype([gate, up]), segs,
                        "gate_up_concat", row_splits=(dims.ffn,))]

    def nemo_to_hf(self, dims, src, fmt):
        fc1 = _need(src, self.nemo.format(**fmt))
        tail = tuple(_size(dims, s) for s in self.trailing)
        _check(fc1, (2 * dims.ffn, *tail), "2 x intermediate_size (gate and up)")
        return [
            Logical(self.gate.format(**fmt), (dims.ffn, *tail), fc1.dtype,
                    (Segment(0, dims.ffn, fc1.name, 0),), "gate_up_split"),
            Logical(self.up.format(**fmt), (dims.ffn, *tail), fc1.dtype,
                    (Segment(0, dims.ffn, fc1.name, dims.ffn),), "gate_up_split"),
        ]


@dataclass(frozen=True)
class TiedOutput(Rule):
    """lm_head ⇄ output_layer, absent on the NeMo side when embeddings are tied.

    Tied HF checkpoints usually omit lm_head.weight; when one is present anyway it is claimed and
    not written (Megatron's output layer then reads the embedding). On export of a tied model no
    lm_head is written: transformers ties it on load.
    """

    hf: str
    nemo: str
    shape: tuple[str | int, ...] = ("V", "H")

    def hf_names(self, dims):
        return (self.hf,)

    def nemo_names(self, dims):
        return () if dims.tied else (self.nemo,)

    def hf_to_nemo(self, dims, src, fmt):
        if dims.tied:
            return []
        return Rename(self.hf, self.nemo, self.shape).hf_to_nemo(dims, src, fmt)

    def nemo_to_hf(self, dims, src, fmt):
        if dims.tied:
            return []
        return Rename(self.hf, self.nemo, self.shape).nemo_to_hf(dims, src, fmt)

    def optional_hf(self, dims: Dims) -> bool:
        return dims.tied


@dataclass(frozen=True)
class VocabRename(Rule):
    """Embedding / output rows ``[V, H]`` ⇄ Megatron's ``[V', H]`` padded to
    ``make_vocab_size_divisible_by`` (spec §5). Import zero-fills the pad rows (NVIDIA's importer
    leaves them uninitialised); export prunes them."""

    hf: str
    nemo: str
    shape: tuple[str | int, ...] = ("V", "H")

    def hf_names(self, dims):
        return (self.hf,)

    def nemo_names(self, dims):
        return (self.nemo,)

    def hf_to_nemo(self, dims, src, fmt):
        t = _need(src, self.hf.format(**fmt))
        _check(t, tuple(_size(dims, s) for s in self.shape), "vocab_size x hidden_size")
        v, vp = dims.vocab, dims.nemo_vocab
        segs = (Segment(0, v, t.name, 0),) + ((Segment(v, vp - v, None, 0),) if vp > v else ())
        return [Logical(self.nemo.format(**fmt), (vp, *t.shape[1:]), t.dtype, segs,
                        "copy" if vp == v else "pad_vocab")]

    def nemo_to_hf(self, dims, src, fmt):
        t = _need(src, self.nemo.format(**fmt))
        want = tuple(_size(dims, s) for s in self.shape)
        if not t.shape or t.shape[0] < dims.vocab or tuple(t.shape[1:]) != want[1:]:
            _check(t, ((dims.nemo_vocab,) + want[1:]), "padded vocab x hidden_size")
        return [Logical(self.hf.format(**fmt), (dims.vocab, *t.shape[1:]), t.dtype, (Segment(0, dims.vocab, t.name, 0),),
                        "copy" if t.shape[0] == dims.vocab else "prune_vocab")]


@dataclass(frozen=True)
class When(Rule):
    """``rule`` for the variants whose ``dims.<attr>`` is in ``values``; no tensors otherwise.
    (ArchSpec.rules is one static table, but Falcon's norms and biases depend on the config; from
    falcon.py.)"""

    attr: str
    values: tuple[Any, ...]
    rule: Rule

    def _on(self, dims: Dims) -> bool:
        return getattr(dims, self.attr) in self.values

    def hf_names(self, dims):
        return self.rule.hf_names(dims) if self._on(dims) else ()

    def nemo_names(self, dims):
        return self.rule.nemo_names(dims) if self._on(dims) else ()

    def hf_to_nemo(self, dims, src, fmt):
        return self.rule.hf_to_nemo(dims, src, fmt) if self._on(dims) else []

    def nemo_to_hf(self, dims, src, fmt):
        return self.rule.nemo_to_hf(dims, src, fmt) if self._on(dims) else []

    @property
    def per_layer(self) -> bool:  # the wrapped rule's names carry {l}, not this wrapper's strings
        return self.rule.per_layer

    @property
    def per_expert(self) -> bool:
        return self.rule.per_expert


# ---- fused HF sources (from phi3.py: Phi-3's qkv_proj and gate_up_proj) --------------------------
@dataclass(frozen=True)
class SplitQKV(Rule):
    """HF's fused ``qkv_proj`` ``[(nh + 2ng)·d, H]`` = cat(q, k, v) ⇄ Megatron's linear_qkv, which holds
    the same rows regrouped per query group: the group's q heads, its k head, its v head (§4.1).
    Both directions are row gathers out of one tensor. Provenance: NeMo r2.5 phi3mini.py
    HFPhi3Importer._import_qkv / HFPhi3Exporter._export_qkv."""

    hf: str
    nemo: str

    def hf_names(self, dims: Dims) -> tuple[str, ...]:
        return (self.hf,)

    def nemo_names(self, dims: Dims) -> tuple[str, ...]:
        return (self.nemo,)

    @staticmethod
    def _pairs(dims: Dims) -> list[tuple[int, int, int]]:
        """(Megatron row, HF row, rows) for each contiguous run."""
        d, hpg, nh, ng = dims.head_dim, dims.heads_per_group, dims.heads, dims.groups
        group = (hpg + 2) * d
        out = []
        for g in range(ng):
            out.append((g * group, g * hpg * d, hpg * d))  # q heads of group g
            out.append((g * group + hpg * d, nh * d + g * d, d))  # k head
            out.append((g * group + (hpg + 1) * d, (nh + ng) * d + g * d, d))  # v head
        return out

    def hf_to_nemo(self, dims, src, fmt):
        t = _need(src, self.hf.format(**fmt))
        _check(t, (_size(dims, "QKV"), dims.hidden), "(heads + 2 x kv heads) x head_dim, hidden")
        segs = tuple(Segment(m, n, t.name, h) for m, h, n in self._pairs(dims))
        return [Logical(self.nemo.format(**fmt), t.shape, t.dtype, segs, "qkv_interleave")]

    def nemo_to_hf(self, dims, src, fmt):
        t = _need(src, self.nemo.format(**fmt))
        _check(t, (_size(dims, "QKV"), dims.hidden), "(heads + 2 x kv heads) x head_dim, hidden")
        segs = tuple(sorted((Segment(h, n, t.name, m) for m, h, n in self._pairs(dims)), key=lambda s: s.out_row))
        return [Logical(self.hf.format(**fmt), t.shape, t.dtype, segs, "qkv_split")]


@dataclass(frozen=True)
class FusedGateUp(Rule):
    """HF's ``gate_up_proj`` ``[2F, H]`` is already [gate; up], Megatron's linear_fc1 layout: same
    bytes, but stored as two chunks per layer (gate rows, up rows) as Megatron writes GLU fc1
    (phi3mini.py copies it as it is)."""

    hf: str
    nemo: str

    def hf_names(self, dims):
        return (self.hf,)

    def nemo_names(self, dims):
        return (self.nemo,)

    def _move(self, dims: Dims, src, name: str, out: str, splits: tuple[int, ...]) -> list[Logical]:
        t = _need(src, name)
        _check(t, (2 * dims.ffn, dims.hidden), "2 x intermediate_size (gate and up), hidden")
        return [Logical(out, t.shape, t.dtype, (Segment(0, 2 * dims.ffn, t.name, 0),), "copy", row_splits=splits)]

    def hf_to_nemo(self, dims, src, fmt):
        return self._move(dims, src, self.hf.format(**fmt), self.nemo.format(**fmt), (dims.ffn,))

    def nemo_to_hf(self, dims, src, fmt):
        return self._move(dims, src, self.nemo.format(**fmt), self.hf.format(**fmt), ())
