"""The typed library API; the CLI is a thin layer over these functions.

Example:
    >>> import hfnemo
    >>> report = hfnemo.convert("Llama-3-8B", "llama3-nemo", to="nemo", max_memory="1GiB")
    >>> report.bytes_written
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hfnemo import dist
from hfnemo.arch import get_spec, spec_for_nemo_model
from hfnemo.arch.rules import Logical
from hfnemo.arch.spec import hf_dims, hf_to_nemo_config, nemo_dims, nemo_to_hf_config
from hfnemo.dtypes import parse_dtype
from hfnemo.errors import ConfigError, ConversionError, InsufficientDisk, OutputExists, UsageError
from hfnemo.exec.executor import execute
from hfnemo.exec.sinks import DcpSink, SafetensorsSink, TorchSaveSink
from hfnemo.exec.staging import run_staged
from hfnemo.io.fileio import OutFile, publish
from hfnemo.exec.sources import RowReader, dcp_sources, hf_sources
from hfnemo.io import hf as hfio
from hfnemo.io import legacy
from hfnemo.io import dcp
from hfnemo.io.dcp import read_index
from hfnemo.io.nemo_configs import STRATEGY_CONFIG_ARGS, PyRef
from hfnemo.io.nemo_context import read_context, write_context
from hfnemo.lazy import LazyModule
from hfnemo.memory import current_rss, peak_rss
from hfnemo.memwatch import parse_size
from hfnemo.plan.plan import Plan, Segment, SourceTensor
from hfnemo.plan.planner import (Budget, budget_plan, check_layout, layout_hf, layout_nemo, layout_ranks,
                                 map_tensors)

if TYPE_CHECKING:
    import torch
else:
    # A CPU conversion streams without torch; it is needed at the end only (common.pt, the DCP
    # .metadata: imported in the background meanwhile, hfnemo.io.dcp.prewarm_writer).
    torch = LazyModule("torch")

DEFAULT_MAX_MEMORY = 2 << 30
DEFAULT_MAX_SHARD = 5_000_000_000
HF_CONFIG_SIDECAR = Path("artifacts") / "hf_config.json"  # the source config.json, verbatim
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Report:
    direction: str
    arch: str
    source: str
    output: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    gb_per_s: float
    peak_rss_bytes: int
    max_memory_bytes: int
    files: list[str] = field(default_factory=list)
    budget: dict[str, int] = field(default_factory=dict)
    resumed_bytes: int = 0  # tensor bytes an interrupted run had written (verified and kept)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _size(v: int | str | None, default: int, what: str) -> int:
    if v is None:
        return default
    if isinstance(v, int):
        return v
    try:
        return parse_size(v)
    except ValueError as e:
        raise UsageError(f"{what} {v!r}: {e}", fix=f"write {what} like 1GiB, 512MiB or 5GB") from None


def _dtype(d: str | None) -> str:
    return "auto" if d in (None, "auto") else parse_dtype(d).name


# ------------------------------------------------------------------------------ source detection

def is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file()


def is_nemo_dir(p: Path) -> bool:
    return (p / "weights" / ".metadata").is_file() or (p / "context").is_dir()


def find_latest(run_dir: str | Path) -> Path:
    """The newest ``*-last`` checkpoint of a training run (``<run>/checkpoints/<name>-last``)."""
    run = Path(run_dir)
    cands = [p for base in (run / "checkpoints", run) if base.is_dir()
             for p in base.glob("*-last") if p.is_dir() and is_nemo_dir(p)]
    if not cands:
        raise UsageError(f"no *-last checkpoint under {run}", file=run,
                         fix="pass the run directory that holds checkpoints/<name>-last/")
    return max(cands, key=lambda p: (p.stat().st_mtime, p.name))


def detect(src: Path) -> str:
    if is_hf_dir(src):
        return "hf"
    if is_nemo_dir(src):
        return "nemo"
    if legacy.is_nemo1_dir(src) or legacy.is_megatron_dir(src) or legacy.is_nemo1_tar(src):
        return "legacy"
    if src.is_dir() and (src / "checkpoints").is_dir():
        raise UsageError(f"{src} is a training run, not a checkpoint", file=src,
                         fix=f"use --latest {src} to pick its newest *-last checkpoint")
    raise UsageError(f"{src} is neither an HF model directory (config.json), a NeMo 2 checkpoint "
                     "(context/ and weights/), a NeMo 1 directory (model_config.yaml) or .nemo file nor a "
                     "Megatron-LM checkpoint (latest_checkpointed_iteration.txt)", file=src, fix="check the path")


# ------------------------------------------------------------------------------ planning

@dataclass
class _Job:
    plan: Plan
    reader: RowReader
    src: Path
    extra: dict[str, Any]


def _plan_import(src: Path, dtype: str, budget: Budget, tp: int = 1, pp: int = 1, ep: int = 1,
                 fmt: str = "nemo2", overrides: dict[str, Any] | None = None,
                 memory: tuple[Any, dict[str, SourceTensor], RowReader] | None = None) -> _Job:
    """The import plan of the HF directory ``src``, or (``memory``: config, sources, reader) of
    an in-memory state dict (:func:`_memory_job`)."""
    cfg = memory[0] if memory else hfio.read_config(src)
    arch = (cfg.data.get("architectures") or [None])[0]
    if not arch:
        raise ConfigError("config.json has no 'architectures'", file=cfg.path,
                          fix='add "architectures": ["LlamaForCausalLM"] (or the right class) to config.json')
    spec = get_spec(arch, where=cfg.path)
    sources, applied, scratch = None, None, None
    if overrides:  # hfnemo.overrides: checked against the weights before anything else
        from hfnemo.overrides import apply_overrides

        sources = memory[1] if memory else hf_sources(hfio.scan_weights(src))
        applied = apply_overrides(spec, cfg, overrides, sources, tp)
        cfg = applied.hf
    dims = hf_dims(spec, cfg.data, cfg.path)
    check_layout(dims, tp, pp, ep)
    if sources is None:
        sources = memory[1] if memory else hf_sources(hfio.scan_weights(src))
    logicals = map_tensors(spec, dims, sources, "hf_to_nemo", str(src))
    if fmt in _DCP_FORMATS:
        items, blobs, files = layout_nemo(spec, dims, logicals, dtype, tp=tp, prefix=_DCP_FORMATS[fmt],
                                          writers=dist.writers())
    else:
        items, blobs, files = _layout_legacy(fmt, spec, dims, logicals, dtype, tp, pp, ep)
    target, nemo_args = hf_to_nemo_config(spec, cfg.data, cfg.path)
    side = {} if memory else _hf_side_files(src)
    if applied is not None:
        nemo_args.update(applied.nemo)
        if applied.changed_hf:  # the kept hf_config.json carries the overrides (export gives them back)
            import tempfile

            scratch = tempfile.TemporaryDirectory(prefix="hfnemo-overrides-")
            side[legacy.HF_CONFIG] = Path(scratch.name) / "config.json"
            side[legacy.HF_CONFIG].write_text(json.dumps(hfio.denormalise_config(cfg.data, cfg.dialect), indent=2,
                                                         sort_keys=True) + "\n")
    # The layout the chunks were cut for (TP=PP=EP=1 stays NVIDIA's importer's config exactly).
    for key, n in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                   ("expert_model_parallel_size", ep)):
        if n > 1:
            nemo_args[key] = n
    if dtype != "auto":
        from hfnemo.arch.config_rules import ParamsDType
        ParamsDType().to_nemo({"torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]},
                              nemo_args, cfg.path)
    plan = Plan(direction="hf_to_nemo", arch=spec.name, source=str(src), dtype=dtype,
                sources=tuple(sources.values()), items=tuple(items), byte_items=tuple(blobs), files=tuple(files),
                config={"_target_": target, **nemo_args}, budget=budget_plan(items, sources, budget),
                layout={"tp": tp, "pp": pp, "ep": ep, "format": fmt})
    return _Job(plan, memory[2] if memory else RowReader(), src, {"spec": spec, "hf": cfg, "dims": dims, "format": fmt,
                                         "side": side, "emb_rows": _embedding_rows(logicals, dims),
                                         "ncfg": _full_config(target, nemo_args), "scratch": scratch})


# Formats whose weights are one torch-dist (DCP) directory, laid out by layout_nemo: its key prefix
# (NeMo 2: the Lightning module's "module."; NeMo 1 dist-ckpt: MegatronGPTModel's "model.") and
# the directory under the output.
_DCP_FORMATS = {"nemo2": "module.", "nemo1-dist": legacy.NEMO1_PREFIX}
_DCP_DIRS = {"nemo2": "weights", "nemo1-dist": legacy.NEMO1_DIST}


def _layout_legacy(fmt: str, spec: Any, dims: Any, logicals: list[Logical], dtype: str, tp: int, pp: int,
                   ep: int) -> tuple[list, list, list[str]]:
    lay = legacy.rank_layout(fmt, tp, pp, ep)
    items, files = layout_ranks(spec, dims, logicals, dtype, lay, legacy.file_namer(fmt, lay))
    return items, [], files


def _hf_side_files(src: Path) -> dict[str, Path]:
    """What legacy outputs carry besides weights: tokenizer files, config.json, generation_config.json."""
    side = {n: src / n for n in hfio.TOKENIZER_FILES if (src / n).is_file()}
    side[legacy.HF_CONFIG] = src / "config.json"
    if (src / "generation_config.json").is_file():
        side[legacy.GENERATION_CONFIG] = src / "generation_config.json"
    return side


def _sidecar_sizes(src: Path) -> dict[str, Any]:
    """Sizes model.yaml may leave to the tokenizer (Mixtral's vocab_size: null) from the source
    config.json hfnemo kept; NVIDIA-written checkpoints have no sidecar."""
    sidecar = src / "context" / HF_CONFIG_SIDECAR
    if not sidecar.is_file():
        return {}
    v = hfio.read_json(sidecar, "hf_config.json").get("vocab_size")
    return {"hf_vocab_size": v} if v else {}


@dataclass
class _NemoCkpt:
    """A NeMo 2 checkpoint opened for reading: context, spec, DCP index, logical sources, dims."""

    where: str
    ctx: Any
    spec: Any
    index: Any
    sources: dict
    config: dict  # model.yaml's config + sizes it may leave null + _target_
    dims: Any


def _open_nemo(src: Path) -> _NemoCkpt:
    where = str(src / "context" / "model.yaml")
    ctx = read_context(src / "context", on_model_target=lambda t: spec_for_nemo_model(t, where=where))
    spec = spec_for_nemo_model(ctx.model_target, where=where)
    index = read_index(src / "weights")
    sources, _prefix = dcp_sources(index)
    emb = sources.get("embedding.word_embeddings.weight")
    # Sizes model.yaml may leave null (vocab_size: NVIDIA's Mixtral/Gemma/Phi-3 importers) come from
    # the source config.json hfnemo kept, else from the stored embedding.
    extra = {**_sidecar_sizes(src), **({"embedding_rows": emb.shape[0]} if emb is not None and emb.shape else {})}
    config = {**ctx.config, **extra, "_target_": ctx.config_target}
    return _NemoCkpt(where, ctx, spec, index, sources, config, nemo_dims(spec, config, where))


def _plan_export(src: Path, dtype: str, budget: Budget, max_shard: int) -> _Job:
    ck = _open_nemo(src)
    where, ctx, spec, index, sources, nemo_cfg, dims = ck.where, ck.ctx, ck.spec, ck.index, ck.sources, ck.config, ck.dims
    logicals = map_tensors(spec, dims, sources, "nemo_to_hf", str(src / "weights"))
    items, files = layout_hf(logicals, dtype, max_shard)
    base, dialect = None, "4"
    sidecar = src / "context" / HF_CONFIG_SIDECAR
    if sidecar.is_file():
        norm = hfio.normalise_config(hfio.read_json(sidecar, "hf_config.json"), str(sidecar))
        base, dialect = norm.data, norm.dialect
    hf_cfg = nemo_to_hf_config(spec, nemo_cfg, base, where)
    if dtype != "auto":
        hf_cfg["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    if not base and ctx.generation_config:
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k in ctx.generation_config:
                hf_cfg.setdefault(k, ctx.generation_config[k])
    plan = Plan(direction="nemo_to_hf", arch=spec.name, source=str(src), dtype=dtype,
                sources=tuple(sources.values()), items=tuple(items), byte_items=(), files=tuple(files),
                config=hfio.denormalise_config(hf_cfg, dialect), budget=budget_plan(items, sources, budget))
    return _Job(plan, RowReader(index=index), src, {"ctx": ctx, "spec": spec})


def _job(src: str | Path, to: str | None, dtype: str | None, max_memory: int | str | None,
         max_shard_size: int | str | None, tp: int = 1, pp: int = 1, ep: int = 1, fmt: str = "nemo2",
         overrides: Any = None) -> _Job:
    from hfnemo.hub import resolve_source
    from hfnemo.overrides import parse_overrides

    overrides = parse_overrides(overrides)
    path = resolve_source(src) if to != "hf" else Path(src).expanduser()  # hf://ORG/NAME: the Hub cache
    if not path.exists():
        raise UsageError(f"{path} does not exist", file=path, fix="check the path")
    if fmt not in legacy.FORMATS:
        raise UsageError(f"--format {fmt!r}", fix=f"use one of {', '.join(legacy.FORMATS)}")
    # `import` means the source is HF even when config.json is missing (then that is the error).
    is_ckpt = (is_nemo_dir(path) or legacy.is_nemo1_dir(path) or legacy.is_megatron_dir(path)
               or legacy.is_nemo1_tar(path))
    kind = "hf" if to == "nemo" and not is_ckpt else detect(path)
    want = to or ("nemo" if kind == "hf" else "hf")
    if (kind, want) not in (("hf", "nemo"), ("nemo", "hf"), ("legacy", "hf")):
        raise UsageError(f"cannot convert a {kind} checkpoint to {want}", file=path,
                         fix="use `hfnemo import` for HF -> NeMo, `hfnemo export` for NeMo -> HF and "
                             "`hfnemo reshard` to change the layout of a NeMo / Megatron checkpoint")
    if overrides and kind != "hf":
        raise UsageError("config overrides apply to an import (HF -> NeMo)", file=path,
                         fix="drop --set / overrides=, or import from the HF model")
    # an import into NeMo 2 pickles torch's DCP classes at the end: imported in the background from
    # now on, its resident size reserved in the budget (hfnemo.io.dcp.prewarm_writer)
    # (else torch may still be imported later, by a legacy writer or the GPU path: counted as well)
    reserve = dcp.prewarm_writer() if kind == "hf" and fmt in _DCP_FORMATS else dcp.torch_import_reserve()
    budget = Budget(max_memory=_size(max_memory, DEFAULT_MAX_MEMORY, "--max-memory"), baseline=current_rss() + reserve)
    if kind == "hf":
        return _plan_import(path, _dtype(dtype), budget, tp, pp, ep, fmt, overrides)
    shard = _size(max_shard_size, DEFAULT_MAX_SHARD, "--max-shard-size")
    if kind == "legacy":
        return _plan_export_legacy(path, _dtype(dtype), budget, shard)
    return _plan_export(path, _dtype(dtype), budget, shard)


def _hf_config(config: Any) -> Any:
    """An in-memory source's config.json: a dict, a transformers config (``to_dict()``), a path to
    config.json or to a directory holding one."""
    from hfnemo.exec.memsource import WHERE

    if config is None:
        raise UsageError("an in-memory state dict needs its HF config", file=WHERE,
                         fix="pass config= (a dict, model.config, or the path of config.json / its directory)")
    if hasattr(config, "to_dict") and not isinstance(config, dict):
        config = config.to_dict()
    if isinstance(config, dict):
        return hfio.normalise_config(json.loads(json.dumps(config, default=str)), "<config>")
    path = Path(config).expanduser()
    return hfio.read_config(path) if path.is_dir() else hfio.normalise_config(
        hfio.read_json(path, "config.json"), str(path))


def _memory_job(tensors: Any, config: Any, dtype: str | None, max_memory: int | str | None, tp: int = 1,
                pp: int = 1, ep: int = 1, overrides: Any = None, allow_cuda: bool = False) -> _Job:
    """The import plan of an HF state dict in host memory (hfnemo.exec.memsource): the tensors
    are the sources, read in place; ``max_memory`` counts what hfnemo allocates beside them."""
    from hfnemo.exec.memsource import WHERE, MemoryReader, memory_sources
    from hfnemo.overrides import parse_overrides

    cfg = _hf_config(config)
    sources = memory_sources(tensors, allow_cuda)
    held = sum(s.nbytes for name, s in sources.items() if tensors[name].device.type == "cpu")
    budget = Budget(max_memory=_size(max_memory, DEFAULT_MAX_MEMORY, "max_memory"),
                    baseline=max(0, current_rss() - held) + dcp.torch_import_reserve())
    job = _plan_import(Path(WHERE), _dtype(dtype), budget, tp, pp, ep, "nemo2", parse_overrides(overrides),
                       memory=(cfg, sources, MemoryReader(tensors)))
    job.extra["held"] = held  # the caller's resident bytes, left out of budgets
    return job


def plan(src: str | Path, *, to: str | None = None, dtype: str | None = "auto",
         max_memory: int | str | None = None, max_shard_size: int | str | None = None,
         tp: int = 1, pp: int = 1, ep: int = 1, format: str = "nemo2", overrides: Any = None) -> Plan:
    """The dry run: every output tensor, its sources and transform, bytes and memory. Writes nothing."""
    job = _job(src, to, dtype, max_memory, max_shard_size, tp, pp, ep, format, overrides)
    job.reader.close()
    return job.plan


# ------------------------------------------------------------------------------ execution

def _check_output(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise OutputExists("the output lies inside the input", file=dst, fix="choose an output outside the source")
    if d in s.parents:
        raise OutputExists("the input lies inside the output; --overwrite would delete it", file=dst,
                           fix="choose another output directory")
    if dst.exists() and not overwrite:
        raise OutputExists("output already exists", file=dst, fix="pass --overwrite to replace it, or pick another path")


def _write_import_extras(job: _Job, staging: Path) -> None:
    cfg: hfio.HfConfig = job.extra["hf"]
    spec = job.extra["spec"]
    weights = staging / "weights"
    # common.pt: what NeMo 2's MegatronStrategy saves besides the weights for an import (§1).
    _save_common(weights / "common.pt")
    (weights / "metadata.json").write_text(json.dumps({
        "sharded_backend": "torch_dist", "sharded_backend_version": 1,
        "common_backend": "torch", "common_backend_version": 1}))
    args = dict(job.plan.config)
    target = args.pop("_target_")
    config_args = [(k, _pyref(v)) for k, v in args.items()] + list(STRATEGY_CONFIG_ARGS)
    seen: set[str] = set()
    config_args = [(k, v) for k, v in config_args if not (k in seen or seen.add(k))]
    gen_path = job.src / "generation_config.json"
    generation = hfio.read_json(gen_path, "generation_config.json") if gen_path.is_file() else None
    if generation is None:
        config_args.append(("generation_config", None))  # NVIDIA's importer records the absence
    has_tok = any((job.src / n).is_file() for n in hfio.TOKENIZER_FILES)
    write_context(staging / "context", model_target=_ref(spec.nemo_model), config_target=_ref(target),
                  config_args=config_args, tokenizer_dir=job.src if has_tok else None,
                  generation_config=generation, tokenizer_args=list(spec.tokenizer_args))
    (staging / "context" / "artifacts").mkdir(exist_ok=True)
    shutil.copyfile((job.extra.get("side") or {}).get(legacy.HF_CONFIG, cfg.path),
                    staging / "context" / HF_CONFIG_SIDECAR)


def _ref(dotted: str) -> PyRef:
    mod, name = dotted.rsplit(".", 1)
    return PyRef(mod, name)


def _pyref(v: Any) -> Any:
    if isinstance(v, str) and v.startswith("torch.") and v.count(".") == 1:
        return _ref(v)
    return v


def save_common(path: str) -> None:
    """torch.save of NeMo 2's common.pt (what MegatronStrategy saves besides the weights)."""
    torch.save(_lightning_common(), path)


def _save_common(path: Path) -> None:
    """common.pt by the torch helper process when it runs (hfnemo.torchside), else here."""
    from hfnemo import torchside

    torchside.run("hfnemo.api", "save_common", os.path.abspath(path))


def _lightning_common() -> dict[str, Any]:
    prog = {"total": {"ready": 0, "completed": 0, "started": 0, "processed": 0},
            "current": {"ready": 0, "completed": 0, "started": 0, "processed": 0}}
    sched = {"total": {"ready": 0, "completed": 0}, "current": {"ready": 0, "completed": 0}}
    return {
        "epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.4.0", "state_dict": {},
        "loops": {"fit_loop": {
            "state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 0},
            "epoch_loop.batch_progress": {**prog, "is_last_batch": False},
            "epoch_loop.scheduler_progress": sched,
            "epoch_loop.automatic_optimization.state_dict": {},
            "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {
                "step": sched, "zero_grad": {"total": {"ready": 0, "completed": 0, "started": 0},
                                             "current": {"ready": 0, "completed": 0, "started": 0}}}},
            "epoch_loop.manual_optimization.state_dict": {},
            "epoch_loop.manual_optimization.optim_step_progress": sched,
            "epoch_loop.val_loop.state_dict": {},
            "epoch_loop.val_loop.batch_progress": {**prog, "is_last_batch": False},
            "epoch_progress": prog},
            "validate_loop": {"state_dict": {}, "batch_progress": {**prog, "is_last_batch": False}},
            "test_loop": {"state_dict": {}, "batch_progress": {**prog, "is_last_batch": False}},
            "predict_loop": {"state_dict": {}, "batch_progress": {"total": {"ready": 0, "completed": 0, "started": 0,
                                                                            "processed": 0},
                                                                  "current": {"ready": 0, "completed": 0,
                                                                              "started": 0, "processed": 0}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, "
                      "'every_n_epochs': 1, 'train_time_interval': None}": {
                          "monitor": None, "best_model_score": None, "best_model_path": "", "current_score": None,
                          "dirpath": None, "best_k_models": {}, "kth_best_model_path": "",
                          "kth_value": torch.tensor(float("inf")), "last_model_path": ""}},
        "optimizer_states": {}, "lr_schedulers": [],
        "content_metadata": {"distrib_optim_sharding_type": "fully_sharded_model_space"},
    }


def _write_export_extras(job: _Job, staging: Path) -> None:
    plan = job.plan
    if len(plan.files) > 1:
        weight_map = {it.key: it.file for it in plan.items}
        index = {"metadata": {"total_size": plan.write_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / hfio.INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (staging / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    ctx = job.extra["ctx"]
    if ctx.generation_config is not None:
        (staging / "generation_config.json").write_text(json.dumps(ctx.generation_config, indent=2,
                                                                   sort_keys=True) + "\n")
    if ctx.tokenizer_dir is not None:
        hfio.copy_tokenizer(ctx.tokenizer_dir, staging)


# --device auto sends a plan's kernels to the GPU only when AUTO_GPU is set, CUDA is visible and the
# plan casts (AUTO_GPU_CUTS: or only cuts columns). From benchmarks/bench_gpu.py's convert_device rows
# (RESULTS.md, GPU; 70B-shaped 7.6 GB import on the H200 machine): casts ran 8-11 % faster with the
# GPU (fp16: 7.22 s vs 8.11 s), a cut-only plan 3 % slower (7.36 s vs 7.16 s); the disk sets the rate.
AUTO_GPU = True
AUTO_GPU_CUTS = False


def _gpu_possible() -> bool:
    """False when this machine certainly has no GPU torch could use (no NVIDIA or AMD device node):
    ``--device auto`` then stays on the CPU without importing torch to ask torch.cuda."""
    if "torch" in sys.modules:
        return True  # asking costs nothing any more
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def _kernels(device: str, threads: int | None, plan: Any = None):
    """The executor's kernels: the CPU backend, or (``cuda``, or ``auto`` when it pays) a
    hfnemo.exec.gpu.DeviceKernels that moves casts and column cuts onto the GPU."""
    from hfnemo.kernels import get_backend

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device!r}", fix="use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible", fix="use --device cpu (or auto)")
    cpu = get_backend("auto", device="cpu", threads=threads)
    if device == "cpu" or (device == "auto" and not _gpu_possible()):
        return cpu
    from hfnemo.plan.planner import plan_has_kernel_work

    work = plan is None or plan_has_kernel_work(plan)
    auto = AUTO_GPU and plan is not None and plan_has_kernel_work(plan, casts_only=not AUTO_GPU_CUTS)
    if device == "auto" and not auto:
        return cpu  # nothing the GPU would do: torch is not imported to ask for it
    if device == "cuda" and work or (device == "auto" and auto and torch.cuda.is_available()):
        from hfnemo.exec.gpu import DeviceKernels

        return DeviceKernels(get_backend("auto", device="cuda"), "cuda", cpu=cpu)
    return cpu


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, dtype: str | None = "auto",
            max_memory: int | str | None = None, max_shard_size: int | str | None = None,
            overwrite: bool = False, progress: ProgressFn | None = None, tp: int = 1, pp: int = 1,
            ep: int = 1, device: str = "auto", threads: int | None = None, format: str = "nemo2",
            overrides: dict[str, Any] | list[str] | None = None, restart: bool = False,
            workers: int | None = None) -> Report:
    """Convert ``src`` (HF directory or NeMo 2 checkpoint) into ``dst``, streaming within ``max_memory``.

    Args:
        src: HF model directory (config.json + safetensors), ``hf://ORG/NAME`` or ``ORG/NAME`` (a Hub
            model, through huggingface_hub's cache; see hfnemo.hub), or a NeMo 2 checkpoint
            (context/ + weights/), NeMo 1 directory or ``.nemo`` file, Megatron-LM checkpoint.
        dst: output directory; it appears only when complete (written beside it, then renamed). A
            path ending in ``.nemo`` is a NeMo 1 ``.nemo`` tar file, streamed (hfnemo.io.nemo_tar).
        to: "nemo" or "hf"; default: the other format.
        dtype: "auto" keeps each tensor's dtype; "bf16"/"fp16"/"fp32" cast with round-to-nearest-even.
        max_memory: peak memory of the process, bytes or a size like "1GiB" (default 2GiB).
        max_shard_size: HF output shard size (default 5GB).
        overwrite: replace an existing dst.
        restart: discard what an interrupted run left in the staging directory beside dst; without
            it, a re-run of the same conversion verifies that work and resumes from it.
        progress: called with (bytes_done, bytes_total) after each block.
        tp, pp, ep: NeMo output cut into the chunks Megatron reads at this tensor/pipeline/expert
            parallelism (checked against heads, layers and experts before anything is written).
        device: "auto", "cpu" or "cuda": where kernels (casts, column cuts) run. "cuda" runs them
            on the GPU (read -> pinned -> H2D -> kernel -> D2H -> write, overlapped; same bytes);
            "auto" does so only when the plan casts or cuts, a GPU is visible and ``AUTO_GPU``.
        threads: CPU kernel threads.
        format: import target: "nemo2" (DCP, default), "nemo1" (.nemo directory with per-rank
            model_weights.ckpt), "nemo1-dist" (NeMo 1 dist-ckpt: model_weights/ a torch-dist
            directory, keys ``model.…``; directory or ``.nemo``) or "megatron" (Megatron-LM
            ckpt_format=torch); see hfnemo.io.legacy.
            Exports read any of them (detected).
        overrides: import only: NeMo config fields to set, ``{"seq_length": 8192}`` or
            ``["seq_length=8192", "hf.rope_theta=1e6"]``; checked against the weights (hfnemo.overrides).
        workers: write with this many processes on this machine (hfnemo.dist: each writes its share
            of the files, rank 0 the index and the manifest; ``max_memory`` holds per process;
            ``progress`` is not called). Under torchrun every rank calls convert() without it.

    Returns:
        A Report with byte counts, time and peak memory (rank 0's process).
    """
    from hfnemo.io import nemo_tar

    if workers is not None and workers != 1:
        return dist.spawn(workers, convert, src, dst, to=to, dtype=dtype, max_memory=max_memory,
                          max_shard_size=max_shard_size, overwrite=overwrite, tp=tp, pp=pp, ep=ep, device=device,
                          threads=threads, format=format, overrides=overrides, restart=restart)

    tar = nemo_tar.wants_tar(dst)
    if tar:
        _refuse_tar_writers(Path(dst))
        nemo_tar.refuse_format(format, Path(dst))
        format = "nemo1-dist" if format == "nemo1-dist" else "nemo1"
    writes_dcp = format in _DCP_FORMATS and (to == "nemo" or to is None and not is_nemo_dir(Path(src).expanduser()))
    with dist.session(device, dcp_metadata=writes_dcp) as group:
        job = dist.agreed(group, lambda: _job(src, to, dtype, max_memory, max_shard_size, tp, pp, ep, format,
                                              overrides))
        if tar:
            if job.plan.direction != "hf_to_nemo":
                job.reader.close()
                raise UsageError(f"{dst} names a NeMo 1 .nemo file, but {src} is already a NeMo checkpoint",
                                 file=dst, fix=f"use `hfnemo reshard {src} {dst}` to repack a NeMo checkpoint as a .nemo")
            return _run_tar(job, dst, overwrite, progress, device, threads)
        return _run(job, dst, overwrite, progress, device, threads, restart, group)


def _refuse_tar_writers(dst: Path) -> None:
    if dist.writers() > 1:
        raise UsageError(f"{dst} is a .nemo tar file, which one process writes", file=dst,
                         fix="write a directory with several processes (then `hfnemo reshard DIR FILE.nemo`), "
                             "or run a single process")


def _run_tar(job: _Job, dst: str | Path, overwrite: bool, progress: ProgressFn | None, device: str,
             threads: int | None) -> Report:
    """Stream a NeMo 1 plan into one ``.nemo`` tar: model_config.yaml and the artifacts first (small,
    generated beside the output, then removed), then each rank's model_weights.ckpt as one member
    written as the executor produces it; the finished file replaces ``dst`` atomically."""
    from hfnemo.io import nemo_tar
    t0 = time.perf_counter()
    dst = Path(dst).expanduser()
    plan = job.plan
    partial = dst.with_name(f".{dst.name}.hfnemo-partial")
    side = dst.with_name(f".{dst.name}.hfnemo-side")
    try:
        kernels = _job_kernels(job, device, threads)
        plan = job.plan
        _check_output(job.src, dst, overwrite)
        dst.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dst.parent).free
        dist = job.extra.get("format") == "nemo1-dist"
        need = plan.write_bytes * (2 if dist else 1) + (64 << 20)  # dist: staged beside it, then packed
        if free < need:
            raise InsufficientDisk(f"the output needs {need} bytes but only {free} are free",
                                   file=dst.parent, fix="free disk space or choose another output disk")
        for p in (partial, side):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        side.mkdir()
        try:
            if dist:  # the DCP files interleave their chunks: written beside dst first, then packed
                dsink = DcpSink(plan, side / legacy.NEMO1_DIST)
                try:
                    execute(plan, job.reader, dsink, progress=progress, kernels=kernels)
                    dsink.finish(checkpoint_id=legacy.NEMO1_DIST)
                except BaseException:
                    dsink.abort()
                    raise
            _write_legacy_extras(job, side)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                writer = nemo_tar.TarWriter(fd)
                dirs: set[str] = set()
                writer.add_dir(".")
                nemo_tar.add_tree(writer, side, dirs)
                if not dist:
                    sink = nemo_tar.NemoTarSink(plan, writer, dirs)
                    execute(plan, job.reader, sink, progress=progress, kernels=kernels)
                    sink.finish()
                writer.close()
                os.fsync(fd)
            finally:
                os.close(fd)
            publish(partial, dst)
        except BaseException:
            if partial.exists():
                partial.unlink()
            raise
        finally:
            shutil.rmtree(side, ignore_errors=True)
    finally:
        job.reader.close()
    return _report(job, dst, t0)


def _job_kernels(job: _Job, device: str, threads: int | None) -> Any:
    """The kernels for ``device``; on the GPU path the job's plan is re-budgeted with the device
    buffers counted too, from the resident size measured now that the CUDA context exists (it
    costs host memory of its own)."""
    plan = job.plan
    kernels = _kernels(device, threads, plan)
    if getattr(kernels, "device", None) is not None:
        job.plan = dataclasses.replace(plan, budget=budget_plan(
            list(plan.items), {s.name: s for s in plan.sources},
            Budget(max_memory=int(plan.budget["max_memory"]), baseline=current_rss() + dcp.pending_import_bytes(),
                   device=True)))
    return kernels


def _report(job: _Job, dst: Path, t0: float, resumed: int = 0) -> Report:
    plan = job.plan
    seconds = time.perf_counter() - t0
    return Report(direction=plan.direction, arch=plan.arch, source=str(job.src), output=str(dst),
                  tensors=len(plan.items), bytes_read=plan.read_bytes, bytes_written=plan.write_bytes,
                  seconds=seconds, gb_per_s=plan.write_bytes / seconds / 1e9 if seconds else 0.0,
                  peak_rss_bytes=peak_rss(), max_memory_bytes=int(plan.budget["max_memory"]),
                  files=list(plan.files), budget=dict(plan.budget), resumed_bytes=resumed)


def _run(job: _Job, dst: str | Path, overwrite: bool, progress: ProgressFn | None, device: str,
         threads: int | None, restart: bool = False, group: dist.Group | None = None) -> Report:
    t0 = time.perf_counter()
    dst = Path(dst).expanduser()
    try:
        if group is not None and threads is None and group.local_size > 1:
            threads = max(1, (os.cpu_count() or 1) // group.local_size)  # the ranks of a machine share its cores

        def prepare() -> Any:
            kernels = _job_kernels(job, device, threads)
            _check_output(job.src, dst, overwrite)
            return kernels

        kernels = dist.agreed(group, prepare)
        plan = job.plan
        # Preflight (nothing written before it passes), the journaled staging directory beside dst,
        # the manifest, the atomic rename: hfnemo.exec.staging (one process) or hfnemo.dist (a rank).
        index = getattr(job.reader, "index", None)
        if group is None:
            resumed = run_staged(plan, job.src, dst, index, restart,
                                 lambda staging, journal: _execute_into(job, staging, dst, progress, kernels, journal),
                                 publish)
        else:
            resumed = dist.run_staged(
                group, plan, job.src, dst, index, restart, _data_dir(job),
                lambda staging, share, journal, bar: _write_share(job, share, staging, dst, bar, kernels, journal),
                lambda staging, results: _finish_shares(job, staging, dst, results), publish, progress)
    finally:
        job.reader.close()
    return _report(job, dst, t0, resumed)


def _data_dir(job: _Job) -> str:
    """Where the plan's data files lie under the output ("weights/" for NeMo 2, "" for HF shards)."""
    fmt = job.extra.get("format", "nemo2")
    return f"{_DCP_DIRS[fmt]}/" if job.plan.direction != "nemo_to_hf" and fmt in _DCP_FORMATS else ""


def _write_share(job: _Job, plan: Plan, staging: Path, dst: Path, progress: ProgressFn | None, kernels: Any,
                 journal: Any = None) -> dict:
    """Stream ``plan`` (the job's, or one rank's share of it) into the sink its target format needs
    and close its files. With a journal (hfnemo.exec.journal), files open through it and a previous
    run's bytes are kept. Returns where each DCP chunk landed (``storage_data``; {} for other
    formats): what ``.metadata`` is written from."""
    fmt = job.extra.get("format", "nemo2")
    opener = journal.open if journal is not None else OutFile
    if plan.direction == "nemo_to_hf":
        sink: Any = SafetensorsSink(plan, staging, opener)
    elif fmt in _DCP_FORMATS:
        sink = DcpSink(plan, staging / _DCP_DIRS[fmt], opener)
    else:
        wrap = (legacy.megatron_wrap(_megatron_args(job)) if fmt == "megatron" else lambda f, sd: sd)
        sink = TorchSaveSink(plan, staging, wrap, opener)
    try:
        execute(plan, job.reader, sink, progress=progress, kernels=kernels, journal=journal)
        if journal is not None:
            journal.flush()  # the tensor data is on disk: a crash from here on replays it all
        if isinstance(sink, DcpSink):
            sink.writer.close()
            return sink.writer.storage_data
        sink.finish()
    except BaseException:
        if journal is not None:
            journal.stop(save=True)  # before abort() closes the files it fsyncs
        sink.abort()
        raise
    return {}


def _finish_shares(job: _Job, staging: Path, dst: Path, storage: list[dict]) -> None:
    """After every writer's data: DCP's ``.metadata`` (from every writer's chunk locations), then the
    side files of the target format."""
    fmt = job.extra.get("format", "nemo2")
    if job.plan.direction != "nemo_to_hf" and fmt in _DCP_FORMATS:
        w = dcp.DcpWriter(staging / _DCP_DIRS[fmt], [])
        DcpSink.declare(w, job.plan)
        for part in storage:
            w.storage_data.update(part)
        w.write_metadata(checkpoint_id=str(dst / _DCP_DIRS[fmt]))
    _write_extras(job, staging)


def _execute_into(job: _Job, staging: Path, dst: Path, progress: ProgressFn | None, kernels: Any,
                  journal: Any = None) -> None:
    """One process: every byte of the plan, then ``.metadata`` and the side files."""
    _finish_shares(job, staging, dst, [_write_share(job, job.plan, staging, dst, progress, kernels, journal)])


def _write_extras(job: _Job, staging: Path) -> None:
    plan = job.plan
    fmt = job.extra.get("format", "nemo2")
    if plan.direction == "nemo_to_hf":
        if "ctx" in job.extra:
            _write_export_extras(job, staging)
        else:
            _write_legacy_export_extras(job, staging)
    elif fmt == "nemo2":
        if plan.direction == "hf_to_nemo":
            _write_import_extras(job, staging)
        elif job.extra.get("src_format") == "nemo2":
            _write_nemo2_reshard_extras(job, staging)
        else:
            _write_nemo2_from_side(job, staging)
    else:
        _write_legacy_extras(job, staging)


# ------------------------------------------------------------------------------ legacy formats

def _plain_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: getattr(v, "target", v) for k, v in cfg.items()}


def _full_config(target: str, args: dict[str, Any]) -> dict[str, Any]:
    """A NeMo 2 config with every field: the class defaults overlaid with the explicit arguments."""
    from hfnemo.io.nemo_configs import config_fields

    try:
        defaults = config_fields(target)
    except KeyError:
        defaults = {}
    return _plain_config({**defaults, **args, "_target_": target})


def _embedding_rows(logicals_or_sources: Any, dims: Any) -> int:
    for x in logicals_or_sources:
        if x.name == "embedding.word_embeddings.weight":
            return x.shape[0]
    return dims.nemo_vocab


def _megatron_args(job: _Job) -> Any:
    lay = job.plan.layout
    spec = job.extra["spec"]
    ncfg = job.extra.get("ncfg") or _full_config(job.plan.config["_target_"], job.plan.config)
    rows = job.extra.get("emb_rows", job.extra["dims"].nemo_vocab)
    return legacy.megatron_args(ncfg, rows, job.extra["dims"].vocab,
                                legacy.rank_layout("megatron", lay["tp"], lay["pp"], lay["ep"]),
                                spec.hf_architectures[0])


def _legacy_model(src: Path) -> dict[str, Any]:
    """Spec, dims, NeMo 2-style config and re-assembled logical sources of a legacy checkpoint."""
    ckpt = legacy.open_legacy(src)
    where = str(src)
    raw = legacy._hf_side(ckpt)
    if raw is not None:
        norm = hfio.normalise_config(raw, where)
        arch = (norm.data.get("architectures") or [None])[0]
        spec = get_spec(arch or "", where=where)
        target, args = hf_to_nemo_config(spec, norm.data, where)
        ncfg = _full_config(target, args)
        base, dialect, hf_vocab = norm.data, norm.dialect, norm.data.get("vocab_size")
    else:
        found = legacy.nemo2_config(ckpt)
        spec = get_spec(ckpt.arch or legacy.guess_arch(found), where=where)
        ncfg = _full_config(spec.nemo_config, found)
        base, dialect, hf_vocab = None, "4", found.get("vocab_size")
    experts = int(ncfg.get("num_moe_experts") or 0)
    sources = legacy.legacy_sources(ckpt, int(ncfg["num_layers"]), experts, bool(ncfg.get("gated_linear_unit")),
                                    bool(ncfg.get("share_embeddings_and_output_weights")))
    emb = sources.get("embedding.word_embeddings.weight")
    extra = {**({"hf_vocab_size": hf_vocab} if hf_vocab else {}),
             **({"embedding_rows": emb.shape[0]} if emb is not None and emb.shape else {})}
    dims = nemo_dims(spec, {**ncfg, **extra}, where)
    return {"ckpt": ckpt, "spec": spec, "dims": dims, "sources": sources, "ncfg": ncfg, "base": base,
            "dialect": dialect, "side": dict(ckpt.side_files)}


def _plan_export_legacy(src: Path, dtype: str, budget: Budget, max_shard: int) -> _Job:
    m = _legacy_model(src)
    spec, dims, sources, ncfg = m["spec"], m["dims"], m["sources"], m["ncfg"]
    logicals = map_tensors(spec, dims, sources, "nemo_to_hf", str(src))
    items, files = layout_hf(logicals, dtype, max_shard)
    hf_cfg = nemo_to_hf_config(spec, ncfg, m["base"], str(src))
    if dtype != "auto":
        hf_cfg["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    plan = Plan(direction="nemo_to_hf", arch=spec.name, source=str(src), dtype=dtype,
                sources=tuple(sources.values()), items=tuple(items), byte_items=(), files=tuple(files),
                config=hfio.denormalise_config(hf_cfg, m["dialect"]), budget=budget_plan(items, sources, budget))
    return _Job(plan, RowReader(), src, {"spec": spec, "side": m["side"], "format": m["ckpt"].fmt,
                                         "ckpt": m["ckpt"]})  # a .nemo's ckpt holds its side files' scratch


def _write_legacy_export_extras(job: _Job, staging: Path) -> None:
    plan = job.plan
    if len(plan.files) > 1:
        weight_map = {it.key: it.file for it in plan.items}
        index = {"metadata": {"total_size": plan.write_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / hfio.INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (staging / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    for name, path in job.extra["side"].items():
        if name != legacy.HF_CONFIG:
            shutil.copyfile(path, staging / name)


def _side_files(job: _Job, tmp: Path) -> dict[str, Path]:
    """Tokenizer files, HF config and generation config of the source, generated into ``tmp`` when
    the source has none (a NeMo 2 checkpoint NVIDIA wrote keeps no HF config.json)."""
    side = dict(job.extra.get("side") or {})
    if legacy.HF_CONFIG not in side:
        tmp.mkdir(parents=True, exist_ok=True)
        hf_cfg = nemo_to_hf_config(job.extra["spec"], job.extra["ncfg"], None, str(job.src))
        (tmp / legacy.HF_CONFIG).write_text(json.dumps(hfio.denormalise_config(hf_cfg, "4"), indent=2,
                                                       sort_keys=True) + "\n")
        side[legacy.HF_CONFIG] = tmp / legacy.HF_CONFIG
    return side


def _write_legacy_extras(job: _Job, staging: Path) -> None:
    tmp = staging / ".hfnemo-side"
    side = _side_files(job, tmp)
    lay = job.plan.layout
    fmt = job.extra["format"]
    if fmt == "nemo1":
        ncfg = job.extra.get("ncfg") or _full_config(job.plan.config["_target_"], job.plan.config)
        rows = job.extra.get("emb_rows", job.extra["dims"].nemo_vocab)
        legacy.write_nemo1_extras(staging, ncfg, rows, legacy.rank_layout(fmt, lay["tp"], lay["pp"], lay["ep"]),
                                  job.extra["spec"].hf_architectures[0], side)
    elif fmt == "nemo1-dist":  # the DCP chunks need no rank layout; model_config.yaml records it
        ncfg = job.extra.get("ncfg") or _full_config(job.plan.config["_target_"], job.plan.config)
        rows = job.extra.get("emb_rows", job.extra["dims"].nemo_vocab)
        legacy.write_nemo1_dist_extras(staging, ncfg, rows,
                                       legacy.RankLayout(lay["tp"], lay["pp"], lay["ep"], legacy.NEMO1_PREFIX),
                                       job.extra["spec"].hf_architectures[0], side)
    else:
        legacy.write_megatron_extras(staging, side)
    shutil.rmtree(tmp, ignore_errors=True)


def _write_nemo2_from_side(job: _Job, staging: Path) -> None:
    """NeMo 2 context/ for a reshard from a legacy checkpoint: as an import from the source's HF
    config, tokenizer and generation config (laid out as an HF directory for the import writer)."""
    import dataclasses

    tmp = staging / ".hfnemo-side"
    side = _side_files(job, tmp / "gen")
    hf_dir = tmp / "hf"
    hf_dir.mkdir(parents=True)
    for name, path in side.items():
        shutil.copyfile(path, hf_dir / ("config.json" if name == legacy.HF_CONFIG else name))
    cfg = hfio.read_config(hf_dir)
    spec = job.extra["spec"]
    target, args = hf_to_nemo_config(spec, cfg.data, cfg.path)
    lay = job.plan.layout
    for key, n in (("tensor_model_parallel_size", lay["tp"]), ("pipeline_model_parallel_size", lay["pp"]),
                   ("expert_model_parallel_size", lay["ep"])):
        if n > 1:
            args[key] = n
    plan = dataclasses.replace(job.plan, config={"_target_": target, **args})
    _write_import_extras(_Job(plan, job.reader, hf_dir, {"spec": spec, "hf": cfg}), staging)
    shutil.rmtree(tmp, ignore_errors=True)


_PARALLEL_KEYS = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
                  "ep": "expert_model_parallel_size"}


def _write_nemo2_reshard_extras(job: _Job, staging: Path) -> None:
    """Copy context/ and the weights side files, with the parallel sizes set to the new layout."""
    src = job.src
    shutil.copytree(src / "context", staging / "context")
    for name in ("common.pt", "metadata.json"):
        if (src / "weights" / name).is_file():
            shutil.copyfile(src / "weights" / name, staging / "weights" / name)
    if not (staging / "weights" / "common.pt").is_file():
        _save_common(staging / "weights" / "common.pt")
    lay = job.plan.layout
    model_yaml = staging / "context" / "model.yaml"
    if model_yaml.is_file():
        import re

        text = model_yaml.read_text()
        for short, key in _PARALLEL_KEYS.items():
            text = re.sub(rf"(?m)^(\s+{key}: )\S+$", rf"\g<1>{lay[short]}", text)
        model_yaml.write_text(text)
    io_json = staging / "context" / "io.json"
    if io_json.is_file():
        doc = json.loads(io_json.read_text())
        for obj in doc.get("objects", {}).values():
            for item in obj.get("items", []) if isinstance(obj, dict) else []:
                for short, key in _PARALLEL_KEYS.items():
                    if (isinstance(item, list) and len(item) == 2 and item[0] == f"Attr(name='{key}')"
                            and isinstance(item[1], dict) and item[1].get("type") == "leaf"):
                        item[1]["value"] = lay[short]
        io_json.write_text(json.dumps(doc))


def _identity_logicals(spec: Any, dims: Any, sources: dict[str, SourceTensor], where: str) -> list[Logical]:
    """Every logical NeMo tensor copied as is, in the order (and with the GLU row splits) an import
    produces. The spec checks coverage both ways: export names must claim every source, and an
    import from those names must give back exactly the same set."""
    hf_side = map_tensors(spec, dims, sources, "nemo_to_hf", where)
    virtual = {lg.name: SourceTensor(lg.name, lg.dtype, lg.shape, ("virtual",)) for lg in hf_side}
    out = []
    for lg in map_tensors(spec, dims, virtual, "hf_to_nemo", where):
        src = sources[lg.name]
        rows = src.shape[0] if src.shape else 1
        out.append(Logical(lg.name, src.shape, src.dtype, (Segment(0, rows, lg.name, 0),), "copy", lg.row_splits))
    wanted = {n for n in sources if "_extra_state" not in n and not n.endswith(spec.hf_ignore_suffixes)}
    if {lg.name for lg in out} != wanted:
        from hfnemo.errors import UnmappedTensors

        odd = sorted(wanted ^ {lg.name for lg in out})
        raise UnmappedTensors(f"the {spec.name} mapping does not round-trip these tensors: {', '.join(odd[:8])}",
                              file=where, tensor=odd[0], fix="this checkpoint needs a spec of its own")
    return out


def _plan_reshard(path: Path, fmt: str | None, dtype: str, budget: Budget, tp: int, pp: int, ep: int) -> _Job:
    kind = detect(path)
    where = str(path)
    if kind == "nemo":
        ck = _open_nemo(path)
        where, ctx, spec, sources, dims = ck.where, ck.ctx, ck.spec, ck.sources, ck.dims
        ncfg = {**ctx.config, "_target_": ctx.config_target}
        reader = RowReader(index=ck.index)
        side: dict[str, Path] = {}
        if ctx.tokenizer_dir is not None:
            side = {n: ctx.tokenizer_dir / n for n in hfio.TOKENIZER_FILES if (ctx.tokenizer_dir / n).is_file()}
        if (path / "context" / HF_CONFIG_SIDECAR).is_file():
            side[legacy.HF_CONFIG] = path / "context" / HF_CONFIG_SIDECAR
        gen = path / "context" / "artifacts" / "generation_config.json"
        if gen.is_file():
            side[legacy.GENERATION_CONFIG] = gen
        src_fmt = "nemo2"
    elif kind == "legacy":
        m = _legacy_model(path)
        spec, dims, sources, ncfg, side = m["spec"], m["dims"], m["sources"], m["ncfg"], m["side"]
        reader = RowReader()
        src_fmt = m["ckpt"].fmt
        keep = m["ckpt"]  # a .nemo's ckpt holds its side files' scratch
    else:
        raise UsageError(f"{path} is an HF model; reshard changes the layout of NeMo / Megatron checkpoints",
                         file=path, fix="use `hfnemo import --tp N --pp N --format ...` for HF models")
    fmt = fmt or src_fmt
    if fmt not in legacy.FORMATS:
        raise UsageError(f"--format {fmt!r}", fix=f"use one of {', '.join(legacy.FORMATS)}")
    check_layout(dims, tp, pp, ep)
    logicals = _identity_logicals(spec, dims, sources, where)
    if fmt in _DCP_FORMATS:
        items, blobs, files = layout_nemo(spec, dims, logicals, dtype, tp=tp, prefix=_DCP_FORMATS[fmt],
                                          writers=dist.writers())
    else:
        items, blobs, files = _layout_legacy(fmt, spec, dims, logicals, dtype, tp, pp, ep)
    ncfg = _plain_config(ncfg)
    for short, n in (("tp", tp), ("pp", pp), ("ep", ep)):
        ncfg[_PARALLEL_KEYS[short]] = n
    plan = Plan(direction="reshard", arch=spec.name, source=str(path), dtype=dtype, sources=tuple(sources.values()),
                items=tuple(items), byte_items=tuple(blobs), files=tuple(files), config=ncfg,
                budget=budget_plan(items, sources, budget), layout={"tp": tp, "pp": pp, "ep": ep, "format": fmt})
    return _Job(plan, reader, path, {"spec": spec, "dims": dims, "ncfg": ncfg, "side": side, "format": fmt,
                                     "src_format": src_fmt, "emb_rows": _embedding_rows(logicals, dims),
                                     "ckpt": keep if kind == "legacy" else None})


def reshard(src: str | Path, dst: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, format: str | None = None,
            dtype: str | None = "auto", max_memory: int | str | None = None, overwrite: bool = False,
            progress: ProgressFn | None = None, device: str = "auto", threads: int | None = None,
            restart: bool = False, workers: int | None = None) -> Report:
    """Change the parallel layout (and optionally the format) of a NeMo 2, NeMo 1 or Megatron-LM
    checkpoint, streaming, without going through HF: every logical NeMo tensor is copied as is
    and cut for the new (tp, pp, ep). ``format`` defaults to the source's. ``workers``: as for
    :func:`convert`."""
    if workers is not None and workers != 1:
        return dist.spawn(workers, reshard, src, dst, tp=tp, pp=pp, ep=ep, format=format, dtype=dtype,
                          max_memory=max_memory, overwrite=overwrite, device=device, threads=threads,
                          restart=restart)
    path = Path(src).expanduser()
    if not path.exists():
        raise UsageError(f"{path} does not exist", file=path, fix="check the path")
    reserve = (dcp.prewarm_writer() if format in (None, *_DCP_FORMATS)  # (None: the source's; counted)
               else dcp.torch_import_reserve())
    budget = Budget(max_memory=_size(max_memory, DEFAULT_MAX_MEMORY, "--max-memory"), baseline=current_rss() + reserve)
    from hfnemo.io import nemo_tar

    tar = nemo_tar.wants_tar(dst)
    if tar:
        _refuse_tar_writers(Path(dst))
        nemo_tar.refuse_format(format, Path(dst))
        format = "nemo1-dist" if format == "nemo1-dist" else "nemo1"
    with dist.session(device, dcp_metadata=format in (None, *_DCP_FORMATS)) as group:
        job = dist.agreed(group, lambda: _plan_reshard(path, format, _dtype(dtype), budget, tp, pp, ep))
        if tar:
            return _run_tar(job, dst, overwrite, progress, device, threads)
        return _run(job, dst, overwrite, progress, device, threads, restart, group)


__all__ = ["convert", "plan", "reshard", "find_latest", "Report", "ConversionError"]
