"""Run many jobs of NVIDIA's own tools in one process of the peer venv (NeMo takes ~15 s to import).

usage: python peer_driver.py JOBS.json RESULTS.json        (with the peer venv's python)

JOBS.json is a list of jobs, run in order (``megatron_load`` jobs first, see below):

  {"op": "import", "src": HF_DIR, "out": NEMO_DIR}        NVIDIA's llm.import_ckpt (nemo_import.py)
  {"op": "export", "src": NEMO_DIR, "out": HF_DIR}        NVIDIA's llm.export_ckpt (nemo_export.py)
  {"op": "megatron_load", "tp": 2, "out": DIR,
   "items": [{"name": N, "ckpt": NEMO_DIR}, ...]}         megatron-core's dist_checkpointing.load of each
                                                          checkpoint at tensor parallelism TP, one gloo
                                                          process per rank (below)

RESULTS.json gets one record per job: ok, seconds, and the traceback of a failure (a failed job
does not stop the others).

megatron_load, per rank of a ``tp``-process gloo group on localhost (processes forked from this one
before any conversion has touched torch.distributed):
  1. NeMo builds the model from the checkpoint's own context/ (io.load_context(...).config
     .configure_model(tokenizer), tensor_model_parallel_size=TP, CPU initialisation): a full
     megatron-core GPTModel of the local (non-Transformer-Engine) layer spec.
  2. model.sharded_state_dict(prefix="module.") is what NeMo's MegatronStrategy hands to
     dist_checkpointing.load. Loads recorded: NeMo's default strictness (ASSUME_OK_UNEXPECTED,
     which raises on a key the model asks for and the checkpoint lacks) and RETURN_ALL ("missing"
     keys: in the checkpoint, not asked for; "unexpected": asked for, absent), for the model as
     built and again with the key set of a Transformer Engine model (plus RAISE_ALL, any mismatch
     raises): each layer's ``self_attention.core_attention._extra_state`` added.
     TEDotProductAttention is no MegatronModule, so megatron's sharded_state_dict_default wraps its
     _extra_state with make_sharded_object_for_checkpoint(..., the layer's sharded_offsets); that
     is reproduced here with the same function (TE itself cannot be installed on this CPU box).
  3. The loaded state dict goes into the model with torch's strict load_state_dict, and the model's
     parameters (each rank's TP shard) are saved to OUT/NAME-rank{r}.pt with the checkpoint key
     and ShardedTensor layout of each, for the caller to compare with its own slices.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

_T0 = time.time()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cpu_compat  # noqa: E402,F401  (before nemo.collections.llm)


# --------------------------------------------------------------------------------------------
# megatron-core load at TP=N
# --------------------------------------------------------------------------------------------

def _te_core_attention_extra_state(sd: dict) -> dict:
    """The ShardedObjects a Transformer Engine layer adds: one core_attention._extra_state per
    layer, with the sharded offsets megatron gives the layer (read off the layer's linear_proj
    _extra_state, which the same TransformerLayer.sharded_state_dict call produced)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    extra = {}
    for k, v in sd.items():
        if k.endswith("self_attention.linear_proj._extra_state") and isinstance(v, ShardedObject):
            offsets = tuple(zip(range(len(v.global_shape)), v.global_offset, v.global_shape))
            key = v.key.replace("linear_proj._extra_state", "core_attention._extra_state")
            extra[k.replace("linear_proj._extra_state", "core_attention._extra_state")] = \
                make_sharded_object_for_checkpoint(None, key, offsets)
    return extra


def _layout(sd: dict) -> dict:
    """{state-dict key: checkpoint key and ShardedTensor layout} (factories: their key only)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out = {}
    for k, v in sd.items():
        if isinstance(v, ShardedTensor):
            out[k] = {"key": v.key, "global_shape": list(v.global_shape),
                      "global_offset": list(v.global_offset), "local_shape": list(v.local_shape),
                      "axis_fragmentations": list(v.axis_fragmentations or ()),
                      "prepend_axis_num": v.prepend_axis_num, "kind": "tensor"}
        elif isinstance(v, ShardedTensorFactory):
            out[k] = {"key": v.key, "kind": "factory"}
        elif isinstance(v, ShardedObject):
            out[k] = {"key": v.key, "global_shape": list(v.global_shape),
                      "global_offset": list(v.global_offset), "kind": "object"}
    return out


def _load_one(item: dict, tp: int, rank: int, out_dir: Path) -> dict:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from nemo.lightning import io

    ckpt = Path(item["ckpt"])
    weights = str(ckpt / "weights")
    model_ctx = io.load_context(str(ckpt / "context"), subpath="model")
    cfg = model_ctx.config
    cfg.tensor_model_parallel_size = tp
    cfg.use_cpu_initialization = True
    cfg.perform_initialization = False
    model = cfg.configure_model(model_ctx.tokenizer)

    def fresh(te: bool) -> dict:
        sd = model.sharded_state_dict(prefix="module.")
        return {**sd, **_te_core_attention_extra_state(sd)} if te else sd

    rec: dict = {"name": item["name"], "rank": rank}

    def attempt(label: str, te: bool, strict) -> dict | None:
        try:
            got = dist_checkpointing.load(fresh(te), weights, strict=strict)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001  (recorded for the caller; DCP errors are BaseExceptions)
            lines = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines()]
            why = sorted({ln for ln in lines if "Error:" in ln or "Exception:" in ln})
            rec[label] = {"ok": False, "error": why[:8] or lines[:8]}
            return None
        if isinstance(got, tuple):
            state, missing, unexpected = got
            rec[label] = {"ok": True, "missing": sorted(missing), "unexpected": sorted(unexpected)}
            return state
        rec[label] = {"ok": True}
        return got

    attempt("local_return_all", False, StrictHandling.RETURN_ALL)
    attempt("te_return_all", True, StrictHandling.RETURN_ALL)
    attempt("te_raise_all", True, StrictHandling.RAISE_ALL)
    attempt("local_default", False, StrictHandling.ASSUME_OK_UNEXPECTED)
    state = attempt("te_default", True, StrictHandling.ASSUME_OK_UNEXPECTED)
    if state is None:
        state = attempt("local_default_again", False, StrictHandling.ASSUME_OK_UNEXPECTED)
    if state is not None:
        # the result also holds common.pt's entries (global_step, ...): the model's are under "module."
        plain = {k[len("module."):]: v for k, v in state.items()
                 if k.startswith("module.") and "core_attention._extra_state" not in k}
        missing, unexpected = model.load_state_dict(plain, strict=True)
        rec["load_state_dict"] = {"missing": list(missing), "unexpected": list(unexpected)}
        params = {k: v.detach().clone() for k, v in model.state_dict().items()
                  if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        torch.save({"params": params, "layout": _layout(model.sharded_state_dict(prefix="module.")),
                    "tp": tp, "rank": rank}, out_dir / f"{item['name']}-rank{rank}.pt")
    return rec


def _rank_main(rank: int, tp: int, port: int, job: dict) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    out_dir = Path(job["out"])
    records = []
    for item in job["items"]:
        t0 = time.time()
        try:
            rec = _load_one(item, tp, rank, out_dir)
        except BaseException:  # noqa: BLE001
            rec = {"name": item["name"], "rank": rank, "error": traceback.format_exc()[-4000:]}
        rec["seconds"] = round(time.time() - t0, 3)
        records.append(rec)
        dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(records, indent=1))
    dist.destroy_process_group()


def megatron_load(job: dict) -> dict:
    import multiprocessing as mp

    tp = int(job.get("tp", 2))
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # the children inherit the imported NeMo/megatron (no 15 s re-import)
    procs = [ctx.Process(target=_rank_main, args=(r, tp, port, job)) for r in range(tp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=job.get("timeout", 900))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.exitcode is None:
            p.kill()
    ranks = [json.loads((Path(job["out"]) / f"rank{r}.json").read_text())
             if (Path(job["out"]) / f"rank{r}.json").exists() else None for r in range(tp)]
    return {"exitcodes": codes, "ranks": ranks, "ok": all(c == 0 for c in codes)}


# --------------------------------------------------------------------------------------------

def fresh_process_io_capture() -> None:
    """Make NeMo's config capture in a batch what it is in a fresh process (one conversion each,
    NVIDIA's usage). NeMo wraps a config class's __init__ on its first instantiation, to record
    the constructor arguments (io.json, model.yaml), and marks the class ``__wrapped_init__ = True``;
    it skips any class for which ``getattr`` finds the mark, which a subclass inherits. In one
    process, the Llama 3 import wraps LlamaConfig, and the Llama 3.1 import after it would build
    an unwrapped Llama31Config, written with every field after __post_init__ instead of its
    arguments. Shadow an inherited mark so that each class is wrapped on its own first use."""
    from nemo.lightning.io import mixin

    orig = mixin._io_wrap_init
    if getattr(orig, "_peer_fresh", False):
        return

    def _io_wrap_init(cls):
        if "__wrapped_init__" not in cls.__dict__:
            cls.__wrapped_init__ = False
        return orig(cls)

    _io_wrap_init._peer_fresh = True
    mixin._io_wrap_init = _io_wrap_init


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results_path = Path(sys.argv[2])
    t0 = _T0
    from nemo.collections import llm  # noqa: F401
    from nemo_export import export_hf, fix_exporter_dtypes
    from nemo_import import import_hf

    fix_exporter_dtypes()
    fresh_process_io_capture()
    environ = dict(os.environ)
    results: list = [None] * len(jobs)
    startup = time.time() - t0
    # gloo groups are forked before any conversion initialises torch.distributed in this process
    order = sorted(range(len(jobs)), key=lambda i: jobs[i]["op"] != "megatron_load")
    for i in order:
        job = jobs[i]
        t = time.time()
        rec = {"job": job, "ok": True}
        os.environ.clear()  # megatron records its attention backend in NVTE_* variables, which then
        os.environ.update(environ)  # contradict the next model's (Gemma after Llama fails)
        try:
            if job["op"] == "import":
                rec["arch"] = import_hf(job["src"], job["out"])
            elif job["op"] == "export":
                export_hf(job["src"], job["out"])
            elif job["op"] == "megatron_load":
                rec.update(megatron_load(job))
            else:
                raise ValueError(f"unknown op {job['op']!r}")
        except BaseException:  # noqa: BLE001  (SystemExit from NeMo included)
            rec["ok"] = False
            rec["error"] = traceback.format_exc()[-6000:]
        rec["seconds"] = round(time.time() - t, 3)
        results[i] = rec
        print(f"PEER_JOB {job['op']} {job.get('src') or job.get('out')} ok={rec['ok']} {rec['seconds']}s",
              flush=True)
        results_path.write_text(json.dumps({"startup_s": round(startup, 3), "results": results}, indent=1))
    results_path.write_text(json.dumps({"startup_s": round(startup, 3), "results": results,
                                        "total_s": round(time.time() - t0, 3)}, indent=1))
    return 0


if __name__ == "__main__":  # the checkpoint writer forks workers
    sys.exit(main())
