"""Command line: argument parsing and exit codes only; the work is in hfnemo.api.

Exit codes: 0 success, 2 a ConversionError (one message: file, tensor, fix), 1 anything else
(a bug: the traceback is printed with -v).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from hfnemo import prefetch
from hfnemo.errors import ConversionError, UsageError


def _progress(enabled: bool) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A tqdm bar on stderr (bytes, bytes/s, ETA) when stderr is a terminal."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = None
    last = 0

    def update(done: int, total: int) -> None:
        nonlocal bar, last
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                       desc="converting", dynamic_ncols=True)
        bar.update(done - last)
        last = done

    return update, lambda: bar.close() if bar is not None else None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="output dtype; casts round to nearest even (default: keep each tensor's dtype)")
    p.add_argument("--max-memory", default="2GiB", help="peak process memory, e.g. 1GiB (default 2GiB)")
    p.add_argument("--max-shard-size", default="5GB", help="HF output shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--restart", action="store_true",
                   help="discard the work an interrupted run left beside the output (default: verify it and resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary on stderr")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks and details")
    p.add_argument("--tp", type=int, default=1, help="NeMo output: tensor-parallel size to cut chunks for")
    p.add_argument("--pp", type=int, default=1, help="NeMo output: pipeline-parallel size (checked)")
    p.add_argument("--ep", type=int, default=1, help="NeMo output: expert-parallel size (checked)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where kernels run")
    p.add_argument("--threads", type=int, default=None, help="CPU kernel threads (default: the cores, shared by the "
                                                              "ranks of a machine)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="write with N processes on this machine, as torchrun --nproc-per-node N would "
                        "(each its share of the files; --max-memory holds per process)")
    p.add_argument("--format", default=None, choices=["nemo2", "nemo1", "nemo1-dist", "megatron"],
                   help="NeMo output format: nemo2 (DCP, default for import), nemo1 (.nemo directory with "
                        "per-rank model_weights.ckpt; an output path ending in .nemo is written as the "
                        ".nemo tar), nemo1-dist (NeMo 1 dist-ckpt: model_weights/ a torch-dist directory; "
                        "directory or .nemo) or megatron (Megatron-LM ckpt_format=torch); reshard: default "
                        "the source's")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", dest="set",
                   help="import: override a NeMo config field (model.yaml's config: keys, e.g. seq_length=8192; "
                        "model_config.KEY too) or, as hf.KEY, a config.json field; checked against the "
                        "weights; repeatable")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hfnemo", description="Streaming HF safetensors <-> NeMo 2 / NeMo 1 / Megatron-LM converter.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("import", help="HF safetensors directory -> NeMo 2 checkpoint directory")
    p.add_argument("src")
    p.add_argument("dst")
    _common(p)
    p = sub.add_parser("export", help="NeMo 2 checkpoint -> HF safetensors directory")
    p.add_argument("src", nargs="?", help="NeMo 2 checkpoint (context/ + weights/)")
    p.add_argument("dst", nargs="?")
    p.add_argument("--latest", metavar="RUN_DIR", help="export the newest <RUN_DIR>/checkpoints/*-last")
    _common(p)
    p = sub.add_parser("plan", help="dry run: every output tensor, sources, transform, bytes, memory, disk")
    p.add_argument("src")
    p.add_argument("--to", choices=["nemo", "hf"])
    p.add_argument("--out", help="output directory whose disk is checked (default: beside the source)")
    p.add_argument("--tensors", action="store_true", help="list every output tensor (default with --json)")
    _common(p)
    p = sub.add_parser("bench", help="time a conversion of SRC on its own disk against a plain copy of the same "
                                     "bytes; peak memory against the budget")
    p.add_argument("src")
    p.add_argument("--to", choices=["nemo", "hf"])
    p.add_argument("--out", help="where the output would go: runs use a scratch directory beside it, on the same "
                                 "filesystem (default: beside the source)")
    p.add_argument("--max-memory", default="2GiB", help="budget passed to the conversion (default 2GiB)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="output dtype")
    p.add_argument("--tp", type=int, default=1, help="NeMo output: tensor-parallel size")
    p.add_argument("--repeat", type=int, default=1, help="runs of each measurement (best and median reported)")
    p.add_argument("--png", metavar="FILE", help="plot bytes/s and memory over time (needs hfnemo[plot])")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout (copy floor, conversion)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory and its outputs")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("reshard", help="change the TP/PP/EP layout (and format) of a NeMo 2 / NeMo 1 / "
                                       "Megatron-LM checkpoint, without going through HF")
    p.add_argument("src")
    p.add_argument("dst")
    _common(p)
    p = sub.add_parser("latest", help="print the newest *-last checkpoint of a training run")
    p.add_argument("run_dir")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("archs", help="the table of supported architectures and their status")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("llm", help="NVIDIA guide syntax: hfnemo llm import|export -y key=value ...")
    p.add_argument("action", choices=["import", "export"])
    p.add_argument("-y", "--yes", action="store_true", help="accepted for compatibility (never prompts)")
    p.add_argument("kv", nargs="*", metavar="KEY=VALUE")
    _common(p)
    from hfnemo import tools

    tools.register(sub)
    return ap


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def _without_workers(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


def _run_convert(args: argparse.Namespace, src: str, dst: str, to: str) -> int:
    from hfnemo import dist

    if args.workers is not None and args.workers != 1:
        # N ranks on this machine (hfnemo.dist), each running this command line without --workers
        return dist.spawn(args.workers, main, _without_workers(args.argv), mode="cli")
    if dist.rank() > 0:  # rank 0 reports for the world
        args.quiet, args.json = True, False
    from hfnemo import kernels
    from hfnemo.api import convert

    kernels.WARN_FALLBACK = not args.quiet
    update, close = _progress(not args.quiet and sys.stderr.isatty())
    old_term = _on_sigterm()
    try:
        if to == "reshard":
            from hfnemo.api import reshard

            if getattr(args, "set", None):
                raise UsageError("--set overrides apply to import", fix="drop --set (reshard keeps the config)")
            report = reshard(src, dst, tp=args.tp, pp=args.pp, ep=args.ep, format=args.format, dtype=args.dtype,
                             max_memory=args.max_memory, overwrite=args.overwrite, progress=update,
                             device=args.device, threads=args.threads, restart=args.restart)
        else:
            report = convert(src, dst, to=to, dtype=args.dtype, max_memory=args.max_memory,
                             max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=update,
                             tp=args.tp, pp=args.pp, ep=args.ep, device=args.device, threads=args.threads,
                             format=getattr(args, "format", None) or "nemo2", overrides=getattr(args, "set", None),
                             restart=args.restart)
    finally:
        close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if report.resumed_bytes:
        _say(args, f"resumed: {report.resumed_bytes / 1e9:.3f} GB an interrupted run had written were verified and kept")
    if args.json:
        print(json.dumps(report.to_json()))
    _say(args, f"{report.direction}: {report.tensors} tensors, {report.bytes_written / 1e9:.3f} GB in "
               f"{report.seconds:.1f} s ({report.gb_per_s:.2f} GB/s), peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB "
               f"-> {report.output}")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the conversion stops with its journal consistent."""


def _on_sigterm() -> Any:
    """Turn SIGTERM into _Terminated while a conversion runs; returns the previous handler."""
    def handler(signum: int, frame: object) -> None:
        raise _Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main() called from a thread)
        return None


def _kv(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"expected KEY=VALUE, got {it!r}", fix="write e.g. source=hf://PATH output_path=OUT")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _llm(args: argparse.Namespace) -> int:
    kv = _kv(args.kv)
    # trainer.devices=0 / trainer.accelerator=cpu: the guide's way to import without a GPU.
    if kv.get("trainer.devices") == "0" or kv.get("trainer.accelerator", "").lower() == "cpu":
        args.device = "cpu"
    # model_config.KEY=VALUE (also model.config.KEY): config overrides, as --set KEY=VALUE.
    sets = [f"{k}={v}" for k, v in kv.items() if k.startswith(("model_config.", "model.config."))]
    if sets:
        args.set = (getattr(args, "set", None) or []) + sets
    if args.action == "import":
        src = kv.get("source")
        if not src:
            raise UsageError("llm import needs source=hf://PATH", fix="add source=hf://<model dir>")
        dst = kv.get("output_path")
        if not dst:  # NeMo's default: $NEMO_HOME/models/<name>
            home = os.environ.get("NEMO_HOME", str(Path.home() / ".cache" / "nemo"))
            dst = str(Path(home) / "models" / Path(src.removeprefix("hf://").split("@")[0].rstrip("/")).name)
        args.overwrite = args.overwrite or kv.get("overwrite", "false").lower() == "true"
        return _run_convert(args, src, dst, "nemo")
    path, dst, target = kv.get("path"), kv.get("output_path"), kv.get("target", "hf")
    if target != "hf":
        raise UsageError(f"target={target!r} is not supported", fix="use target=hf")
    if not path or not dst:
        raise UsageError("llm export needs path=CKPT and output_path=OUT", fix="add both")
    args.overwrite = args.overwrite or kv.get("overwrite", "false").lower() == "true"
    return _run_convert(args, path, dst, "hf")


def _plan(args: argparse.Namespace) -> int:
    from hfnemo.api import plan

    p = plan(args.src, to=args.to, dtype=args.dtype, max_memory=args.max_memory, max_shard_size=args.max_shard_size,
             tp=args.tp, pp=args.pp, ep=args.ep, format=args.format or "nemo2", overrides=args.set)
    out_dir = Path(args.out) if args.out else Path(args.src).resolve().parent
    while not out_dir.exists():
        out_dir = out_dir.parent
    free = shutil.disk_usage(out_dir).free
    summary: dict[str, Any] = {
        "direction": p.direction, "arch": p.arch, "source": p.source, "dtype": p.dtype,
        "tensors": len(p.items), "read_bytes": p.read_bytes, "write_bytes": p.write_bytes,
        "files": list(p.files), "peak_memory_bytes": p.budget["peak_estimate"], "budget": p.budget,
        "free_disk_bytes": free, "disk_ok": free >= p.write_bytes, "config": p.config,
    }
    if args.json:
        summary["items"] = [{"key": it.key, "offsets": list(it.offsets), "shape": list(it.shape), "dtype": it.dtype,
                             "transform": it.transform, "file": it.file, "bytes": it.nbytes,
                             "sources": sorted({s.source for s in it.segments if s.source})} for it in p.items]
        from hfnemo.plan.plan import json_default

        print(json.dumps(summary, default=json_default))
        return 0
    w = sys.stdout.write
    w(f"{p.direction} ({p.arch}): {len(p.items)} output tensors, read {p.read_bytes / 1e9:.3f} GB, "
      f"write {p.write_bytes / 1e9:.3f} GB into {', '.join(p.files)}\n")
    w(f"memory: peak <= {p.budget['peak_estimate'] / 2**20:.0f} MiB of {p.budget['max_memory'] / 2**20:.0f} MiB "
      f"(baseline {p.budget['baseline'] / 2**20:.0f} MiB + {p.budget['depth']} x "
      f"{p.budget['buffers_per_slot']} x {p.budget['block_bytes'] / 2**20:.0f} MiB blocks)\n")
    w(f"disk: {free / 1e9:.1f} GB free at {out_dir} ({'enough' if free >= p.write_bytes else 'NOT ENOUGH'})\n")
    if args.tensors or args.verbose:
        for it in p.items:
            srcs = sorted({s.source for s in it.segments if s.source})
            where = f" @{list(it.offsets)}" if it.offsets else ""
            w(f"  {it.key}{where} {list(it.shape)} {it.dtype} <- {it.transform}({', '.join(srcs)}) [{it.file}]\n")
    return 0


def _early_workers(argv: Sequence[str]) -> int | None:
    """``--workers N`` (N > 1) of a conversion command, read without the full parser."""
    if argv[:1] not in (["import"], ["export"], ["reshard"], ["llm"]):
        return None
    for i, a in enumerate(argv):
        v = argv[i + 1] if a == "--workers" and i + 1 < len(argv) else a.partition("=")[2] if a.startswith(
            "--workers=") else None
        if v is not None:
            return int(v) if v.isdigit() and int(v) > 1 else None
    return None


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line; a usage error is printed by rank 0 alone (every rank parses the same one)."""
    from hfnemo import dist

    if dist.rank() == 0:
        return build_parser().parse_args(argv)
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["llm"]:
        # NVIDIA's `nemo llm import -y k=v ...`: -y may sit between the action and the key=values,
        # which argparse cannot interleave with a variadic positional.
        argv = [a for a in argv if a not in ("-y", "--yes")]
    n = _early_workers(argv)
    if n is not None:
        # N ranks on this machine, started before the parser (its tools import torch, seconds on a
        # CUDA build, which this launcher does not need): each rank parses the command line itself.
        from hfnemo import dist

        return dist.spawn(n, main, _without_workers(argv), mode="cli")
    # Read the source ahead while the parser's tools import torch and the conversion plans
    # (hfnemo.prefetch: bounded, stops at the conversion's first read, HFNEMO_PREFETCH=0 turns it off).
    prefetch.start_for_argv(argv, _common)
    args = _parse(argv)
    args.argv = argv
    try:
        if getattr(args, "tool", None) is not None:
            return args.tool(args)
        if args.cmd == "import":
            return _run_convert(args, args.src, args.dst, "nemo")
        if args.cmd == "export":
            from hfnemo.api import find_latest

            if args.latest:
                if args.src and not args.dst:
                    args.dst = args.src
                src = str(find_latest(args.latest))
                _say(args, f"latest checkpoint: {src}")
            else:
                src = args.src
            if not src or not args.dst:
                raise UsageError("export needs NEMO_DIR and OUT_DIR (or --latest RUN_DIR OUT_DIR)",
                                 fix="hfnemo export NEMO_DIR OUT_DIR")
            return _run_convert(args, src, args.dst, "hf")
        if args.cmd == "reshard":
            return _run_convert(args, args.src, args.dst, "reshard")
        if args.cmd == "plan":
            return _plan(args)
        if args.cmd == "bench":
            from hfnemo.bench import run as bench

            return bench(args)
        if args.cmd == "latest":
            from hfnemo.api import find_latest

            print(find_latest(args.run_dir))
            return 0
        if args.cmd == "archs":
            from hfnemo.arch import status_table

            rows = status_table()
            if args.json:
                print(json.dumps(rows))
                return 0
            print(f"{'architecture':24s} {'family':8s} {'NeMo model':28s} status")
            for r in rows:
                print(f"{r['architecture']:24s} {r['family']:8s} {r['nemo_model'].rsplit('.', 1)[-1]:28s} {r['status']}")
            return 0
        if args.cmd == "llm":
            return _llm(args)
    except ConversionError as e:
        from hfnemo import dist

        if getattr(e, "quiet", False) or (isinstance(e, UsageError) and dist.rank() > 0):
            return e.exit_code  # rank 0 reports another rank's failure, and a usage error is every rank's
        if getattr(args, "json", False):
            print(json.dumps(e.to_json()))
        print(f"hfnemo: error: {e}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return e.exit_code
    except BrokenPipeError:  # `hfnemo plan ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as e:
        staging = getattr(e, "hfnemo_staging", None)
        if staging is not None:
            print(f"hfnemo: interrupted; no output was published (the source is untouched). The work done so "
                  f"far is kept in {staging}: re-run the same command to resume, or pass --restart to start "
                  "over", file=sys.stderr)
        else:
            print("hfnemo: interrupted; no output was published (the source is untouched)", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
