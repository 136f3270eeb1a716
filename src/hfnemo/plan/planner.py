"""make_plan: (spec, source tensors, config, target layout, budget) -> Plan. Pure; touches no files."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from hfnemo.arch.rules import Dims, Logical, Rule, TiedOutput
from hfnemo.arch.spec import ArchSpec
from hfnemo.dtypes import BY_NAME, FLOAT_DTYPES
from hfnemo.errors import BudgetExceeded, UnmappedTensors, UsageError
from hfnemo.io.torchzip import archive_bytes, object_pickle
from hfnemo.plan.plan import BytesItem, OutputItem, Plan, Segment, SourceTensor

_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_NAME = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Budget:
    """The memory arithmetic: what the process already holds, and what buffers may use."""

    max_memory: int
    baseline: int  # resident bytes before any buffer (interpreter, torch, metadata)
    depth: int = 4  # row blocks in flight (read ahead of the writer)
    max_block: int = 64 << 20
    reserve: int = 48 << 20  # headroom for Python objects, page tables, allocator slack
    # --device cuda: each slot also holds device buffers, counted like host ones, and pinned host
    # blocks are powers of two (torch's pinned allocator rounds requests up to one).
    device: bool = False


def _expand(rule: Rule, dims: Dims) -> list[dict[str, object]]:
    layers = [{"l": l} for l in range(dims.num_layers)] if rule.per_layer else [{}]
    if rule.per_expert:
        return [{**f, "e": e} for f in layers for e in range(dims.experts)]
    return layers


def map_tensors(spec: ArchSpec, dims: Dims, sources: Mapping[str, SourceTensor], direction: str,
                where: str) -> list[Logical]:
    """Apply every rule; fail with one message naming all missing, unclaimed or doubly claimed tensors."""
    hf_side = direction == "hf_to_nemo"
    claimed: dict[str, int] = {}
    missing: list[str] = []
    jobs: list[tuple[Rule, dict[str, object]]] = []
    for rule in spec.rules:
        for fmt in _expand(rule, dims):
            names = rule.hf_names(dims) if hf_side else rule.nemo_names(dims)
            optional = hf_side and isinstance(rule, TiedOutput) and rule.optional_hf(dims)
            for n in (x.format(**fmt) for x in names):
                if n in sources:
                    claimed[n] = claimed.get(n, 0) + 1
                elif not optional:
                    missing.append(n)
            jobs.append((rule, fmt))
    ignored = {n for n in sources if n.endswith(spec.hf_ignore_suffixes) or "_extra_state" in n}
    unclaimed = sorted(set(sources) - set(claimed) - ignored)
    doubled = sorted(n for n, c in claimed.items() if c > 1)
    if missing or unclaimed or doubled:
        parts = []
        if missing:
            parts.append(f"{len(missing)} expected tensor(s) missing: {', '.join(missing[:12])}"
                         + (" ..." if len(missing) > 12 else ""))
        if unclaimed:
            parts.append(f"{len(unclaimed)} tensor(s) no rule maps: {', '.join(unclaimed[:12])}"
                         + (" ..." if len(unclaimed) > 12 else ""))
        if doubled:
            parts.append(f"tensor(s) claimed by two rules: {', '.join(doubled)}")
        raise UnmappedTensors(
            f"the {spec.name} mapping does not cover this checkpoint exactly; " + "; ".join(parts),
            file=where, tensor=(missing or unclaimed or doubled)[0],
            fix="check that config.json (num_hidden_layers, tie_word_embeddings, architectures) matches the "
                "weights; if it does, this variant needs a spec of its own")
    out: list[Logical] = []
    for rule, fmt in jobs:
        out.extend(rule.hf_to_nemo(dims, sources, fmt) if hf_side else rule.nemo_to_hf(dims, sources, fmt))
    return out


def _out_dtype(requested: str, src_dtype: str) -> str:
    if requested == "auto" or src_dtype not in FLOAT_DTYPES:
        return src_dtype
    return requested


def _row_elems(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


# Megatron's tensor-parallel split of each NeMo tensor (spec §3.3, make_sharded_tensors_for_checkpoint):
# column-parallel linears and the vocab-parallel embedding/output split rows (dim 0 of the layer's
# tensor); row-parallel linears split columns (dim 1); norms, routers and row-parallel biases are
# replicated. Row splits (GLU halves) are split per half, as apply_swiglu_sharded_factory does.
_TP_SPLIT = (
    (re.compile(r"(^|\.)linear_(qkv|fc1)\.(weight|bias)$"), "rows"),
    (re.compile(r"^(embedding\.word_embeddings|output_layer)\.(weight|bias)$"), "rows"),
    (re.compile(r"(^|\.)linear_(proj|fc2)\.weight$"), "cols"),
)


def tp_split_kind(name: str) -> str | None:
    """'rows', 'cols' or None (replicated) for a logical NeMo tensor name."""
    for pattern, kind in _TP_SPLIT:
        if pattern.search(name):
            return kind
    return None


def check_layout(dims: Dims, tp: int, pp: int, ep: int) -> None:
    """Megatron's divisibility rules, checked before anything is written."""
    problems = []
    for flag, n in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if n < 1:
            problems.append(f"{flag} {n} must be at least 1")
    if problems:
        raise UsageError("; ".join(problems), fix="use positive parallel sizes")
    if dims.groups % tp:
        problems.append(f"--tp {tp} does not divide the {dims.groups} query groups (key/value heads)")
    if dims.heads % tp:
        problems.append(f"--tp {tp} does not divide the {dims.heads} attention heads")
    if dims.ffn % tp:
        problems.append(f"--tp {tp} does not divide ffn size {dims.ffn}")
    if dims.nemo_vocab % tp:
        problems.append(f"--tp {tp} does not divide the vocabulary ({dims.nemo_vocab} rows)")
    if dims.num_layers % pp:
        problems.append(f"--pp {pp} does not divide the {dims.num_layers} layers")
    if ep > 1 and not dims.experts:
        problems.append(f"--ep {ep} needs a mixture-of-experts model (this one is dense)")
    elif dims.experts and dims.experts % ep:
        problems.append(f"--ep {ep} does not divide the {dims.experts} experts")
    if problems:
        raise UsageError("invalid parallel layout: " + "; ".join(problems),
                         fix="choose --tp dividing the kv heads, ffn and vocab, --pp dividing the layers, "
                             "--ep dividing the experts")


def _cols(segs: tuple[Segment, ...], col: int, cols: int) -> tuple[Segment, ...]:
    return tuple(Segment(s.out_row, s.rows, s.source, s.src_row, col if s.source else 0, cols if s.source else 0)
                 for s in segs)


def _slice(segs: tuple[Segment, ...], r0: int, r1: int) -> tuple[Segment, ...]:
    """The segments covering output rows [r0, r1), rebased to start at 0."""
    out = []
    for s in segs:
        a, b = max(r0, s.out_row), min(r1, s.out_row + s.rows)
        if a < b:
            out.append(Segment(a - r0, b - a, s.source, s.src_row + a - s.out_row if s.source else 0, s.col, s.cols))
    return tuple(out)


def _split_files(items: list[OutputItem], byte_keys: list[str], n_files: int,
                 groups: list[int] | None = None) -> tuple[list[int], list[int]]:
    """torch DCP's _split_by_size_and_type: blobs round-robin, tensors largest-first to the
    lightest file. Mirrors how Megatron spreads items over __0_0 / __0_1. Items of one group
    (``groups[i]``: the tensor-parallel column windows of one source tensor) go to one file as
    one unit, so that they are written one after the other while the source rows are cached."""
    byte_files = [i % n_files for i in range(len(byte_keys))]
    groups = groups if groups is not None else list(range(len(items)))
    members: dict[int, list[int]] = {}
    for idx, g in enumerate(groups):
        members.setdefault(g, []).append(idx)
    size = {g: sum(items[i].nbytes for i in m) for g, m in members.items()}
    sizes = [0] * n_files
    tensor_files = [0] * len(items)
    for g in sorted(members, key=lambda g: -size[g]):
        f = min(range(n_files), key=lambda k: sizes[k])
        for idx in members[g]:
            tensor_files[idx] = f
        sizes[f] += size[g]
    return byte_files, tensor_files


EXTRA_STATE_PAYLOAD = archive_bytes(object_pickle([None]))  # what a non-FP8 run stores (reference)


def layout_nemo(spec: ArchSpec, dims: Dims, logicals: list[Logical], dtype: str, *, prefix: str = "module.",
                n_files: int = 2, tp: int = 1, writers: int = 1) -> tuple[list[OutputItem], list[BytesItem], list[str]]:
    """Stack per-layer tensors on a leading axis, one chunk per layer (two for GLU fc1) and per
    tensor-parallel rank: each rank then reads exactly its own chunks.

    ``writers`` processes write the checkpoint together (hfnemo.dist): writer ``w`` owns the files
    ``__<w>_<i>.distcp``, as torch DCP names each rank's files, and the chunks are spread over all
    ``writers x n_files`` files by size, so every writer gets an equal share of the bytes."""
    names = [f"__{w}_{i}.distcp" for w in range(writers) for i in range(n_files)]
    pending: list[OutputItem] = []
    windows: dict[tuple, tuple] = {}  # (key, offsets) of a column-window chunk -> its tensor rows
    for lg in logicals:
        m = _EXPERT_NAME.match(lg.name)
        if m:
            key = "decoder.layers.mlp.experts.experts." + m.group(3)
            lead: tuple[int, ...] = (int(m.group(1)), int(m.group(2)))
            lead_shape: tuple[int, ...] = (dims.num_layers, -1)
        else:
            m = _LAYER_NAME.match(lg.name)
            key, lead, lead_shape = ((f"decoder.layers.{m.group(2)}", (int(m.group(1)),), (dims.num_layers,))
                                     if m else (lg.name, (), ()))
        out_dtype = _out_dtype(dtype, lg.dtype)
        rows = lg.shape[0] if lg.shape else 1
        kind = tp_split_kind(lg.name) if tp > 1 else None
        bounds = [0, *lg.row_splits, rows]
        if kind == "rows":  # each GLU half (or the whole tensor) in tp equal row blocks
            bounds = [0] + [a + (b - a) * (i + 1) // tp for a, b in zip(bounds, bounds[1:]) for i in range(tp)]
        col_windows = [(0, 0)]
        if kind == "cols":
            width = lg.shape[1] // tp
            col_windows = [(r * width, width) for r in range(tp)]
        for r0, r1 in zip(bounds, bounds[1:]):
            for col, cols in col_windows:
                tail = tuple(lg.shape[1:])
                if cols:
                    tail = (cols, *tail[1:])
                chunk_shape = (1,) * len(lead) + ((r1 - r0, *tail) if lg.shape else ())
                segs = _slice(lg.segments, r0, r1)
                offsets = lead + ((r0, col) + (0,) * (len(lg.shape) - 2) if cols else
                                  (r0,) + (0,) * (len(lg.shape) - 1) if lg.shape else ())
                if cols:
                    windows[(prefix + key, offsets)] = (prefix + key, lead, r0)
                pending.append(OutputItem(
                    key=prefix + key, shape=chunk_shape, dtype=out_dtype, rows=r1 - r0,
                    row_elems=_row_elems((0, *tail)) if lg.shape else 1,
                    segments=_cols(segs, col, cols) if cols else segs, transform=lg.transform, file="",
                    offsets=offsets, global_shape=lead_shape + tuple(lg.shape)))
    # Global shapes of stacked expert tensors need the expert count, known only now.
    experts = {}
    for it in pending:
        if len(it.global_shape) > 1 and it.global_shape[1] == -1:
            experts[it.key] = max(experts.get(it.key, 0), it.offsets[1] + 1)
    # State-dict order: per key, chunks by layer (Megatron registers each key's chunks together).
    order: dict[str, int] = {}
    for it in pending:
        order.setdefault(it.key, len(order))
    pending.sort(key=lambda it: (order[it.key], it.offsets))
    items = [OutputItem(**{**it.__dict__, "global_shape": (it.global_shape[0], experts[it.key], *it.global_shape[2:])})
             if it.key in experts else it for it in pending]
    L, E = dims.num_layers, dims.experts
    byte_keys = []
    for l in range(L):  # per layer: its modules, then each expert's (reference order)
        byte_keys += [f"{prefix}decoder.layers.{mod}._extra_state/shard_{l}_{L}" for mod in spec.extra_state]
        byte_keys += [f"{prefix}decoder.layers.{mod}._extra_state/shard_{l}.{e}_{L}.{E}"
                      for e in range(E) for mod in spec.expert_extra_state]
    # The column windows of one tensor's rows form one group (written one after the other, from
    # source rows read once into the page cache); every other chunk is a group of its own.
    ids: dict[tuple, int] = {}
    groups = []
    for i, it in enumerate(items):
        w = windows.get((it.key, tuple(it.offsets)))
        groups.append(i if w is None else ids.setdefault(w, len(items) + len(ids)))
    byte_files, tensor_files = _split_files(items, byte_keys, len(names), groups)
    items = [OutputItem(**{**it.__dict__, "file": names[f]}) for it, f in zip(items, tensor_files)]
    blobs = [BytesItem(k, EXTRA_STATE_PAYLOAD.hex(), names[f]) for k, f in zip(byte_keys, byte_files)]
    # Write order: each file's blobs, then its tensors largest first (as torch's writer does); the
    # column windows of one tensor together, in column order.
    group_bytes: dict[int, int] = {}
    for it, g in zip(items, groups):
        group_bytes[g] = group_bytes.get(g, 0) + it.nbytes
    first: dict[int, int] = {}
    for idx, g in enumerate(groups):
        first.setdefault(g, idx)
    write_order = sorted(range(len(items)),
                         key=lambda i: (tensor_files[i], -group_bytes[groups[i]], first[groups[i]], i))
    items = [items[i] for i in write_order]
    return items, blobs, names


def layout_hf(logicals: list[Logical], dtype: str, max_shard_size: int) -> tuple[list[OutputItem], list[str]]:
    """Shard HF tensors in model order like transformers; inside a file, names sorted like safetensors."""
    shards: list[list[Logical]] = [[]]
    size = 0
    for lg in logicals:
        n = (lg.shape[0] if lg.shape else 1) * _row_elems(lg.shape) * BY_NAME[_out_dtype(dtype, lg.dtype)].itemsize
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(lg)
        size += n
    total = len(shards)
    files = ["model.safetensors"] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                                                       for i in range(total)]
    items = []
    for fname, shard in zip(files, shards):
        for lg in sorted(shard, key=lambda x: x.name):
            items.append(OutputItem(key=lg.name, shape=lg.shape, dtype=_out_dtype(dtype, lg.dtype),
                                    rows=lg.shape[0] if lg.shape else 1, row_elems=_row_elems(lg.shape),
                                    segments=lg.segments, transform=lg.transform, file=fname))
    return items, files


def source_row_bytes(it: OutputItem, seg: Segment, sources: Mapping[str, SourceTensor]) -> int:
    """Bytes of one source row a segment reads: whole source rows when it cuts a column window."""
    src = sources[seg.source]
    return (_row_elems(src.shape) if seg.cols else it.row_elems) * BY_NAME[src.dtype].itemsize


def widest_row(it: OutputItem, sources: Mapping[str, SourceTensor]) -> int:
    return max([it.row_elems * BY_NAME[it.dtype].itemsize] +
               [source_row_bytes(it, s, sources) for s in it.segments if s.source])


def budget_plan(items: list[OutputItem], sources: Mapping[str, SourceTensor], budget: Budget) -> dict[str, int]:
    """Block size and buffer count so that baseline + buffers stays under max_memory."""
    casting = any(sources[s.source].dtype != it.dtype for it in items for s in it.segments if s.source)
    slicing = any(s.cols for it in items for s in it.segments)
    widest = max([1] + [widest_row(it, sources) for it in items])
    # output buffer, + staging (source dtype or whole source rows), + a second one to slice then cast
    per_slot = 1 + (casting or slicing) + (casting and slicing)
    device_per_slot = per_slot if budget.device and per_slot > 1 else 0  # d_stage, d_out (+ d_stage2)
    buffers = per_slot + device_per_slot
    usable = budget.max_memory - budget.baseline - budget.reserve
    block = min(budget.max_block, usable // (budget.depth * buffers)) if usable > 0 else 0
    block -= block % 4096
    largest = max((it.rows * widest for it in items), default=0)
    block = min(block, max(4096, -(-largest // 4096) * 4096))  # small models need no 64 MiB buffers
    if budget.device and block >= 4096:
        block = 1 << (block.bit_length() - 1)
    if block < widest:
        need = budget.baseline + budget.reserve + budget.depth * buffers * max(widest, 4096)
        raise BudgetExceeded(
            f"--max-memory {budget.max_memory} bytes is too small: the process already holds "
            f"{budget.baseline} bytes and one row needs {widest} bytes x {budget.depth * buffers} buffers",
            fix=f"raise --max-memory to at least {need >> 20} MiB")
    return {"max_memory": budget.max_memory, "baseline": budget.baseline, "reserve": budget.reserve,
            "depth": budget.depth, "buffers_per_slot": per_slot, "device_buffers_per_slot": device_per_slot,
            "block_bytes": block, "buffer_bytes": budget.depth * buffers * block,
            "peak_estimate": budget.baseline + budget.reserve + budget.depth * buffers * block}


# ------------------------------------------------------------------ per-rank legacy layouts (spec §6)

@dataclass(frozen=True)
class RankLayout:
    """Which rank files a legacy checkpoint has and what goes in them."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    prefix: str = ""  # "model." for NeMo 1 (in-memory names of MegatronGPTModel), "" for Megatron-LM

    def ranks(self) -> list[tuple[int, int, int]]:
        """(tp, pp, ep) ranks in file order."""
        return [(t, p, e) for p in range(self.pp) for t in range(self.tp) for e in range(self.ep)]


def _stage_of(name: str, dims: Dims, lay: RankLayout) -> tuple[int, str, int | None]:
    """Pipeline stage, name local to it, and EP rank of an expert tensor (None: every EP rank)."""
    per_stage = dims.num_layers // lay.pp
    m = _EXPERT_NAME.match(name)
    if m:
        l, e = int(m.group(1)), int(m.group(2))
        per_ep = dims.experts // lay.ep
        return (l // per_stage, f"decoder.layers.{l % per_stage}.mlp.experts.local_experts.{e % per_ep}.{m.group(3)}",
                e // per_ep)
    m = _LAYER_NAME.match(name)
    if m:
        l = int(m.group(1))
        return l // per_stage, f"decoder.layers.{l % per_stage}.{m.group(2)}", None
    # Megatron's GPTModel: the embedding lives on the first stage (pre_process), the final norm
    # and the output layer on the last (post_process).
    return (0 if name.startswith("embedding.") else lay.pp - 1), name, None


def tp_local_segments(lg: Logical, kind: str | None, tp: int, r: int) -> tuple[tuple[Segment, ...], tuple[int, ...]]:
    """Segments and shape of tensor-parallel rank r's local shard of a logical tensor.

    Column-parallel (rows): rank r holds block r of each GLU half, local = cat(gate_r, up_r) as the
    in-memory TP-local tensor does (spec §3.3); QKV rows are whole query groups because tp divides
    the groups. Row-parallel (cols): a column window of every row. Replicated: the whole tensor."""
    rows = lg.shape[0] if lg.shape else 1
    if tp == 1 or kind is None:
        return lg.segments, lg.shape
    if kind == "cols":
        width = lg.shape[1] // tp
        return _cols(lg.segments, r * width, width), (lg.shape[0], width, *lg.shape[2:])
    bounds = [0, *lg.row_splits, rows]
    segs: list[Segment] = []
    out = 0
    for a, b in zip(bounds, bounds[1:]):
        n = (b - a) // tp
        for s in _slice(lg.segments, a + r * n, a + (r + 1) * n):
            segs.append(Segment(s.out_row + out, s.rows, s.source, s.src_row, s.col, s.cols))
        out += n
    return tuple(segs), (out, *lg.shape[1:])


def layout_ranks(spec: ArchSpec, dims: Dims, logicals: list[Logical], dtype: str, lay: RankLayout,
                 file_of: Callable[[int, int, int], str], *, extra_state: bool = True) -> tuple[list[OutputItem], list[str]]:
    """Legacy per-rank checkpoints (NeMo 1 ``model_weights.ckpt``, Megatron-LM ``model_optim_rng.pt``):
    every rank file holds the LOCAL shards of its (tp, pp, ep) rank under in-memory names, layer
    (and expert) indices local to the stage (and EP rank). One OutputItem per local tensor, items
    grouped by file in state-dict order (embedding, layers in order, final norm, output layer).

    ``extra_state``: add Transformer Engine ``<module>._extra_state`` entries as empty uint8 tensors
    (what TE >= 2 returns without FP8; set_extra_state treats it as a no-op), so that Megatron's
    strict load_state_dict finds every key."""
    if dims.num_layers % lay.pp or (lay.ep > 1 and (not dims.experts or dims.experts % lay.ep)):
        raise UsageError(f"layout tp={lay.tp} pp={lay.pp} ep={lay.ep} does not divide the model",
                         fix="choose --pp dividing the layers and --ep dividing the experts")
    by_name = {lg.name: lg for lg in logicals}
    extra: list[Logical] = []
    if dims.tied and lay.pp > 1 and "embedding.word_embeddings.weight" in by_name:
        # With PP>1 the last stage owns its own output_layer.weight (GPTModel allocates it when
        # pre_process is False) holding a copy of the embedding that Megatron keeps in sync by an
        # all-reduce; its state dict, hence its file, has it.
        emb = by_name["embedding.word_embeddings.weight"]
        extra.append(Logical("output_layer.weight", emb.shape, emb.dtype, emb.segments, "tied_copy", emb.row_splits))

    def section(lg: Logical) -> tuple[int, int, int]:
        m = _EXPERT_NAME.match(lg.name) or _LAYER_NAME.match(lg.name)
        if m:
            return (1, int(m.group(1)), int(m.group(2)) if m.re is _EXPERT_NAME else -1)
        return (0, 0, 0) if lg.name.startswith("embedding.") else (2, 0, 0)

    ordered = sorted(list(logicals) + extra, key=section)  # stable: rule order inside a layer
    per_file: dict[str, list[OutputItem]] = {}
    files = [file_of(t, p, e) for t, p, e in lay.ranks()]
    for f in files:
        per_file[f] = []
    for lg in ordered:
        stage, local, ep_rank = _stage_of(lg.name, dims, lay)
        kind = tp_split_kind(lg.name)
        for t, p, e in lay.ranks():
            if p != stage or (ep_rank is not None and e != ep_rank):
                continue
            segs, shape = tp_local_segments(lg, kind, lay.tp, t)
            f = file_of(t, p, e)
            per_file[f].append(OutputItem(
                key=lay.prefix + local, shape=tuple(shape), dtype=_out_dtype(dtype, lg.dtype),
                rows=shape[0] if shape else 1, row_elems=_row_elems(shape) if shape else 1, segments=segs,
                transform=lg.transform if lay.tp == 1 or kind is None else f"{lg.transform}+tp_{kind}",
                file=f))
    items: list[OutputItem] = []
    for f in files:
        items.extend(_with_extra_state(per_file[f], spec, dims, lay) if extra_state else per_file[f])
    return items, files


def _with_extra_state(its: list[OutputItem], spec: ArchSpec, dims: Dims, lay: RankLayout) -> list[OutputItem]:
    """Insert each local layer's TE ``_extra_state`` entries after the layer's last tensor."""
    f = its[0].file if its else ""
    last: dict[int, int] = {}
    for i, it in enumerate(its):
        m = _LAYER_NAME.match(it.key[len(lay.prefix):])
        if m:
            last[int(m.group(1))] = i
    per_ep = dims.experts // lay.ep if dims.experts else 0
    out: list[OutputItem] = []
    for i, it in enumerate(its):
        out.append(it)
        for l, j in last.items():
            if j != i:
                continue
            keys = [f"decoder.layers.{l}.{m}._extra_state" for m in spec.extra_state]
            keys += [f"decoder.layers.{l}.mlp.experts.local_experts.{e}.{m.removeprefix('mlp.experts.experts.')}"
                     "._extra_state" for e in range(per_ep) for m in spec.expert_extra_state]
            out.extend(OutputItem(key=lay.prefix + k, shape=(0,), dtype="u8", rows=0, row_elems=1, segments=(),
                                  transform="te_extra_state", file=f) for k in keys)
    return out


def plan_has_kernel_work(plan: Plan, casts_only: bool = False) -> bool:
    """Whether some segment of the plan casts or (unless ``casts_only``) cuts columns."""
    sources = {s.name: s for s in plan.sources}
    return any((s.cols and not casts_only) or sources[s.source].dtype != it.dtype
               for it in plan.items for s in it.segments if s.source)
