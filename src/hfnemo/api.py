"""The typed library API; the CLI is a thin layer over these functions.

Example:
    >>> import hfnemo
    >>> report = hfnemo.convert("Llama-3-8B", "llama3-nemo", to="nemo", max_memory="1GiB")
    >>> report.bytes_written
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hfnemo.arch import get_spec, spec_for_nemo_model
from hfnemo.arch.spec import hf_dims, hf_to_nemo_config, nemo_dims, nemo_to_hf_config
from hfnemo.dtypes import parse_dtype
from hfnemo.errors import ConfigError, ConversionError, InsufficientDisk, OutputExists, UsageError
from hfnemo.exec.executor import execute
from hfnemo.exec.sinks import DcpSink, SafetensorsSink
from hfnemo.exec.sources import RowReader, dcp_sources, hf_sources
from hfnemo.io import hf as hfio
from hfnemo.io.dcp import read_index
from hfnemo.io.nemo_configs import STRATEGY_CONFIG_ARGS, PyRef
from hfnemo.io.nemo_context import read_context, write_context
from hfnemo.memory import current_rss, peak_rss
from hfnemo.memwatch import parse_size
from hfnemo.plan.plan import Plan
from hfnemo.plan.planner import Budget, budget_plan, check_layout, layout_hf, layout_nemo, map_tensors

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
    if src.is_dir() and (src / "checkpoints").is_dir():
        raise UsageError(f"{src} is a training run, not a checkpoint", file=src,
                         fix=f"use --latest {src} to pick its newest *-last checkpoint")
    raise UsageError(f"{src} is neither an HF model directory (config.json) nor a NeMo 2 checkpoint "
                     "(context/ and weights/)", file=src, fix="check the path")


# ------------------------------------------------------------------------------ planning

@dataclass
class _Job:
    plan: Plan
    reader: RowReader
    src: Path
    extra: dict[str, Any]


def _plan_import(src: Path, dtype: str, budget: Budget, tp: int = 1, pp: int = 1, ep: int = 1) -> _Job:
    cfg = hfio.read_config(src)
    arch = (cfg.data.get("architectures") or [None])[0]
    if not arch:
        raise ConfigError("config.json has no 'architectures'", file=cfg.path,
                          fix='add "architectures": ["LlamaForCausalLM"] (or the right class) to config.json')
    spec = get_spec(arch, where=cfg.path)
    dims = hf_dims(spec, cfg.data, cfg.path)
    check_layout(dims, tp, pp, ep)
    tensors = hfio.scan_weights(src)
    sources = hf_sources(tensors)
    logicals = map_tensors(spec, dims, sources, "hf_to_nemo", str(src))
    items, blobs, files = layout_nemo(spec, dims, logicals, dtype, tp=tp)
    target, nemo_args = hf_to_nemo_config(spec, cfg.data, cfg.path)
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
                layout={"tp": tp, "pp": pp, "ep": ep})
    return _Job(plan, RowReader(), src, {"spec": spec, "hf": cfg, "dims": dims})


def _sidecar_sizes(src: Path) -> dict[str, Any]:
    """Sizes model.yaml may leave to the tokenizer (Mixtral's vocab_size: null) from the source
    config.json hfnemo kept; NVIDIA-written checkpoints have no sidecar."""
    sidecar = src / "context" / HF_CONFIG_SIDECAR
    if not sidecar.is_file():
        return {}
    v = hfio.read_json(sidecar, "hf_config.json").get("vocab_size")
    return {"hf_vocab_size": v} if v else {}


def _plan_export(src: Path, dtype: str, budget: Budget, max_shard: int) -> _Job:
    where = str(src / "context" / "model.yaml")
    ctx = read_context(src / "context", on_model_target=lambda t: spec_for_nemo_model(t, where=where))
    spec = spec_for_nemo_model(ctx.model_target, where=where)
    index = read_index(src / "weights")
    sources, _prefix = dcp_sources(index)
    emb = sources.get("embedding.word_embeddings.weight")
    # Sizes model.yaml may leave null (vocab_size: NVIDIA's Mixtral/Gemma/Phi-3 importers) come from
    # the source config.json hfnemo kept, else from the stored embedding.
    extra = {**_sidecar_sizes(src), **({"embedding_rows": emb.shape[0]} if emb is not None and emb.shape else {})}
    nemo_cfg = {**ctx.config, **extra, "_target_": ctx.config_target}
    dims = nemo_dims(spec, nemo_cfg, where)
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
         max_shard_size: int | str | None, tp: int = 1, pp: int = 1, ep: int = 1) -> _Job:
    path = Path(src).expanduser()
    if not path.exists():
        raise UsageError(f"{path} does not exist", file=path, fix="check the path")
    # `import` means the source is HF even when config.json is missing (then that is the error).
    kind = "hf" if to == "nemo" and not is_nemo_dir(path) else detect(path)
    want = to or ("nemo" if kind == "hf" else "hf")
    if (kind, want) not in (("hf", "nemo"), ("nemo", "hf")):
        raise UsageError(f"cannot convert a {kind} checkpoint to {want}", file=path,
                         fix="use `hfnemo import` for HF -> NeMo and `hfnemo export` for NeMo -> HF")
    budget = Budget(max_memory=_size(max_memory, DEFAULT_MAX_MEMORY, "--max-memory"), baseline=current_rss())
    if kind == "hf":
        return _plan_import(path, _dtype(dtype), budget, tp, pp, ep)
    return _plan_export(path, _dtype(dtype), budget, _size(max_shard_size, DEFAULT_MAX_SHARD, "--max-shard-size"))


def plan(src: str | Path, *, to: str | None = None, dtype: str | None = "auto",
         max_memory: int | str | None = None, max_shard_size: int | str | None = None,
         tp: int = 1, pp: int = 1, ep: int = 1) -> Plan:
    """The dry run: every output tensor, its sources and transform, bytes and memory. Writes nothing."""
    job = _job(src, to, dtype, max_memory, max_shard_size, tp, pp, ep)
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


def _publish(staging: Path, dst: Path) -> None:
    """Atomically put the finished staging directory in place of dst."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.hfnemo-old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(staging, dst)
    dfd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_import_extras(job: _Job, staging: Path) -> None:
    cfg: hfio.HfConfig = job.extra["hf"]
    spec = job.extra["spec"]
    weights = staging / "weights"
    # common.pt: what NeMo 2's MegatronStrategy saves besides the weights for an import (§1).
    torch.save(_lightning_common(), weights / "common.pt")
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
    shutil.copyfile(cfg.path, staging / "context" / HF_CONFIG_SIDECAR)


def _ref(dotted: str) -> PyRef:
    mod, name = dotted.rsplit(".", 1)
    return PyRef(mod, name)


def _pyref(v: Any) -> Any:
    if isinstance(v, str) and v.startswith("torch.") and v.count(".") == 1:
        return _ref(v)
    return v


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


def _kernels(device: str, threads: int | None):
    from hfnemo.kernels import get_backend

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device!r}", fix="use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible", fix="use --device cpu (or auto)")
    # The streaming executor stages through host memory; its kernels are the CPU ones. The CUDA
    # path (hfnemo.exec.gpu) serves in-memory conversion onto the GPU.
    return get_backend("auto", device="cpu", threads=threads)


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, dtype: str | None = "auto",
            max_memory: int | str | None = None, max_shard_size: int | str | None = None,
            overwrite: bool = False, progress: ProgressFn | None = None, tp: int = 1, pp: int = 1,
            ep: int = 1, device: str = "auto", threads: int | None = None) -> Report:
    """Convert ``src`` (HF directory or NeMo 2 checkpoint) into ``dst``, streaming within ``max_memory``.

    Args:
        src: HF model directory (config.json + safetensors) or NeMo 2 checkpoint (context/ + weights/).
        dst: output directory; it appears only when complete (written beside it, then renamed).
        to: "nemo" or "hf"; default: the other format.
        dtype: "auto" keeps each tensor's dtype; "bf16"/"fp16"/"fp32" cast with round-to-nearest-even.
        max_memory: peak memory of the process, bytes or a size like "1GiB" (default 2GiB).
        max_shard_size: HF output shard size (default 5GB).
        overwrite: replace an existing dst.
        progress: called with (bytes_done, bytes_total) after each block.
        tp, pp, ep: NeMo output cut into the chunks Megatron reads at this tensor/pipeline/expert
            parallelism (checked against heads, layers and experts before anything is written).
        device: "auto", "cpu" or "cuda": where kernels (casts, column cuts) run.
        threads: CPU kernel threads.

    Returns:
        A Report with byte counts, time and peak memory.
    """
    t0 = time.perf_counter()
    dst = Path(dst).expanduser()
    job = _job(src, to, dtype, max_memory, max_shard_size, tp, pp, ep)
    plan = job.plan
    kernels = _kernels(device, threads)
    try:
        _check_output(job.src, dst, overwrite)
        dst.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dst.parent).free
        if free < plan.write_bytes + (64 << 20):
            raise InsufficientDisk(f"the output needs {plan.write_bytes} bytes but only {free} are free",
                                   file=dst.parent, fix="free disk space or choose another output disk")
        staging = dst.with_name(f".{dst.name}.hfnemo-partial")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            if plan.direction == "hf_to_nemo":
                sink = DcpSink(plan, staging / "weights")
                try:
                    execute(plan, job.reader, sink, progress=progress, kernels=kernels)
                    sink.finish(checkpoint_id=str(dst / "weights"))
                except BaseException:
                    sink.abort()
                    raise
                _write_import_extras(job, staging)
            else:
                hsink = SafetensorsSink(plan, staging)
                try:
                    execute(plan, job.reader, hsink, progress=progress, kernels=kernels)
                    hsink.finish()
                except BaseException:
                    hsink.abort()
                    raise
                _write_export_extras(job, staging)
            _publish(staging, dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        job.reader.close()
    seconds = time.perf_counter() - t0
    return Report(direction=plan.direction, arch=plan.arch, source=str(job.src), output=str(dst),
                  tensors=len(plan.items), bytes_read=plan.read_bytes, bytes_written=plan.write_bytes,
                  seconds=seconds, gb_per_s=plan.write_bytes / seconds / 1e9 if seconds else 0.0,
                  peak_rss_bytes=peak_rss(), max_memory_bytes=int(plan.budget["max_memory"]),
                  files=list(plan.files), budget=dict(plan.budget))


__all__ = ["convert", "plan", "find_latest", "Report", "ConversionError"]
