"""``hfnemo validate HF_DIR NEMO``: what NVIDIA's guide's model_validator checks, deterministically.

Both models run in transformers on the CPU (or ``--device``), one after the other (only one is in
memory at a time): the HF model from its directory, the NeMo checkpoint (NeMo 2, NeMo 1 directory
or ``.nemo``, Megatron-LM) through hfnemo's own export plan, executed into memory (no disk output)
and loaded into the transformers model of the config.json that export writes. Reported: the
parameter counts of both, per prompt the largest absolute logit difference, the top-1 and top-k
agreement of the next-token distributions, and greedy generations side by side (text when a
tokenizer is found in either checkpoint, else token ids).

Pass/fail: the parameter counts must match and every logit must be within ``atol`` (default 0:
bit-identical logits, what a lossless conversion gives); with ``atol`` 0 the greedy generations
must match too. The CLI exits 1 when they disagree, 2 on a ConversionError.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hfnemo.lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # imported on first use: parsing the command line must not cost it

from hfnemo.errors import ConfigError, UsageError

DEFAULT_PROMPTS = ("The quick brown fox jumps over the lazy dog", "def hello_world():")
DEFAULT_IDS = (1, 17, 42, 7, 99, 3, 64, 12)


@dataclass
class PromptResult:
    prompt: str | None  # the text, or None when given as token ids
    input_ids: list[int]
    max_abs_diff: float
    logits_equal: bool
    top1_agreement: float  # fraction of positions whose argmax agrees
    topk_agreement: float  # mean overlap of the top-k sets, over positions
    hf_generated: list[int]
    nemo_generated: list[int]
    hf_text: str | None = None
    nemo_text: str | None = None

    @property
    def generation_match(self) -> bool:
        return self.hf_generated == self.nemo_generated


@dataclass
class Validation:
    hf: str
    nemo: str
    hf_params: int
    nemo_params: int  # the NeMo checkpoint loaded as the HF model its export describes
    nemo_stored_params: int  # elements stored in the NeMo checkpoint (padded vocabulary rows included)
    atol: float
    top_k: int
    tokenizer: str | None  # where the tokenizer came from; None: token ids
    prompts: list[PromptResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def max_abs_diff(self) -> float:
        return max((p.max_abs_diff for p in self.prompts), default=0.0)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"], out["max_abs_diff"] = self.ok, self.max_abs_diff
        for p, d in zip(self.prompts, out["prompts"]):
            d["generation_match"] = p.generation_match
        return out


class _MemorySink:
    """Executor sink that assembles each output tensor in memory (validation only: the whole model
    is held, as a model in memory is anyway)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._buf: memoryview | None = None
        self._at = 0

    def begin(self, item: Any) -> None:
        from hfnemo.dtypes import BY_NAME

        if item.offsets and any(item.offsets):
            raise AssertionError("validate expects whole HF tensors")
        t = torch.empty(item.shape, dtype=BY_NAME[item.dtype].torch)
        self.tensors[item.key] = t
        self._buf = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        self._at = 0

    def write(self, item: Any, data: memoryview) -> None:
        n = len(data)
        self._buf[self._at:self._at + n] = data
        self._at += n

    def end(self, item: Any) -> None:
        if self._at != item.nbytes:
            raise AssertionError(f"{item.key}: got {self._at} of {item.nbytes} bytes")
        self._buf = None


def _nemo_as_hf(nemo_src: Path, max_memory: str | int | None, tok_dir: Path
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor], int, bool]:
    """(config.json, HF-named tensors, stored parameter count, whether tokenizer files were found)
    of a NeMo checkpoint, through hfnemo's export plan executed into memory; its tokenizer files are
    copied into ``tok_dir`` under their HF names."""
    from hfnemo import api
    from hfnemo.exec.executor import execute
    from hfnemo.io import hf as hfio
    from hfnemo.kernels import get_backend

    job = api._job(nemo_src, "hf", "auto", max_memory, None)
    try:
        sink = _MemorySink()
        execute(job.plan, job.reader, sink, kernels=get_backend("auto", device="cpu"))
    finally:
        job.reader.close()
    stored = sum(_numel(s.shape) for s in job.plan.sources if "_extra_state" not in s.name)
    tok: dict[str, Path] = {}
    ctx = job.extra.get("ctx")
    if ctx is not None and ctx.tokenizer_dir is not None:
        tok = {n: ctx.tokenizer_dir / n for n in hfio.TOKENIZER_FILES if (ctx.tokenizer_dir / n).is_file()}
    else:
        tok = {n: p for n, p in (job.extra.get("side") or {}).items() if n in hfio.TOKENIZER_FILES}
    for name, path in tok.items():  # (a .nemo's artifacts live as long as job.extra["ckpt"])
        shutil.copyfile(path, tok_dir / name)
    return dict(job.plan.config), sink.tensors, stored, bool(tok)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tokenizer(hf_dir: Path, nemo_tok: Path | None) -> tuple[Any, str | None]:
    from transformers import AutoTokenizer

    from hfnemo.io import hf as hfio

    cands: list[tuple[Path, str]] = []
    if any((hf_dir / n).is_file() for n in hfio.TOKENIZER_FILES):
        cands.append((hf_dir, str(hf_dir)))
    if nemo_tok is not None:
        cands.append((nemo_tok, "the NeMo checkpoint"))
    for d, label in cands:
        try:
            return AutoTokenizer.from_pretrained(str(d)), label
        except Exception:  # a partial or foreign tokenizer: try the other side, else token ids
            continue
    return None, None


def _saved_dtype(cfg: dict[str, Any]) -> torch.dtype:
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").removeprefix("torch.")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _load(model_dir: Path | None, cfg: dict[str, Any], state: dict[str, torch.Tensor] | None, dtype: str,
          device: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    want = torch.float32 if dtype == "fp32" else _saved_dtype(cfg)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if model_dir is not None:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=want, attn_implementation="eager")
        else:  # the model class of the config export wrote, loaded from the in-memory tensors
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            conf = AutoConfig.for_model(**cfg)
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(conf)]
            model = cls.from_pretrained(None, config=conf, state_dict=state, dtype=want, attn_implementation="eager")
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def _run_model(model: Any, inputs: list[list[int]], max_new_tokens: int, eos: Any, device: str
               ) -> list[tuple[torch.Tensor, list[int]]]:
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=eos if isinstance(eos, int) else 0)
    out = []
    with torch.inference_mode():
        for ids in inputs:
            x = torch.tensor([ids], dtype=torch.long, device=device)
            logits = model(input_ids=x, use_cache=False).logits[0].float().cpu()
            seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen)
            out.append((logits, seq[0, x.shape[1]:].tolist()))
    return out


def _compare(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[float, bool, float, float]:
    if a.shape != b.shape:
        return float("inf"), False, 0.0, 0.0
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    k = max(1, min(k, a.shape[-1]))
    ta, tb = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    overlap = [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)]
    return diff, torch.equal(a, b), top1, sum(overlap) / len(overlap)


def validate(hf_dir: str | Path, nemo_src: str | Path, *, prompts: Sequence[str] | None = None,
             ids: Sequence[Sequence[int]] | None = None, max_new_tokens: int = 16, top_k: int = 5,
             atol: float = 0.0, dtype: str = "auto", device: str = "cpu",
             max_memory: str | int | None = None) -> Validation:
    """Compare the HF model in ``hf_dir`` with the NeMo checkpoint ``nemo_src`` as models.

    Args:
        hf_dir: HF model directory (or ``hf://ORG/NAME``).
        nemo_src: NeMo 2 checkpoint, NeMo 1 directory or ``.nemo`` file, Megatron-LM checkpoint.
        prompts: texts (need a tokenizer in either checkpoint); default two fixed sentences.
        ids: prompts as token ids (no tokenizer needed); the default without a tokenizer.
        max_new_tokens: greedy generation length.
        top_k: k of the top-k agreement.
        atol: largest logit difference accepted (0: bit-identical logits and generations).
        dtype: "auto" runs each model in its stored dtype, "fp32" both in float32.
        device: where the models run ("cpu", "cuda").
        max_memory: budget of the export plan's streaming buffers.

    Returns:
        A Validation; ``.ok`` says whether the two agree.
    """
    from hfnemo.hub import resolve_source
    from hfnemo.io import hf as hfio

    try:
        import transformers  # noqa: F401
    except ImportError:  # pragma: no cover - the test extra installs it
        raise UsageError("hfnemo validate runs both models in transformers, which is not installed",
                         fix="pip install 'hfnemo[validate]'") from None
    if dtype not in ("auto", "fp32"):
        raise UsageError(f"--dtype {dtype!r}", fix="use auto or fp32")
    if atol < 0 or atol != atol:
        raise UsageError(f"--atol {atol}", fix="give a non-negative tolerance (0: bit-exact)")
    hf_path = resolve_source(hf_dir)
    if not (hf_path / "config.json").is_file():
        raise ConfigError(f"{hf_path} is not an HF model directory (no config.json)", file=hf_path,
                          fix="pass the HF model directory first, the NeMo checkpoint second")
    hf_cfg = hfio.read_json(hf_path / "config.json", "config.json")
    with tempfile.TemporaryDirectory(prefix="hfnemo-validate-") as tmp:
        nemo_cfg, nemo_state, stored, has_tok = _nemo_as_hf(Path(nemo_src).expanduser(), max_memory, Path(tmp))
        tok, tok_from = _tokenizer(hf_path, Path(tmp) if has_tok else None)
    vocab = int(hf_cfg.get("vocab_size") or nemo_cfg.get("vocab_size") or 2)
    inputs: list[list[int]] = []
    labels: list[str | None] = []
    for seq in ids or ():
        bad = [i for i in seq if not 0 <= int(i) < vocab]
        if bad or not seq:
            raise UsageError(f"token ids {list(seq)} are not in [0, {vocab})", fix="give ids within the vocabulary")
        inputs.append([int(i) for i in seq])
        labels.append(None)
    texts = list(prompts or ()) or ([] if ids else list(DEFAULT_PROMPTS) if tok is not None else [])
    if texts and tok is None:
        raise UsageError("text prompts need a tokenizer, and neither checkpoint has one",
                         fix="pass token ids instead: --ids '1 17 42'")
    for t in texts:
        enc = tok(t, add_special_tokens=True)["input_ids"]
        inputs.append(list(enc) or [0])
        labels.append(t)
    if not inputs:
        inputs, labels = [[i % vocab for i in DEFAULT_IDS]], [None]
    eos = hf_cfg.get("eos_token_id")

    hf_model = _load(hf_path, hf_cfg, None, dtype, device)
    hf_params = sum(p.numel() for p in hf_model.parameters())
    hf_runs = _run_model(hf_model, inputs, max_new_tokens, eos, device)
    del hf_model
    nemo_model = _load(None, nemo_cfg, nemo_state, dtype, device)
    del nemo_state
    nemo_params = sum(p.numel() for p in nemo_model.parameters())
    nemo_runs = _run_model(nemo_model, inputs, max_new_tokens, eos, device)
    del nemo_model

    res = Validation(str(hf_path), str(nemo_src), hf_params, nemo_params, stored, atol, top_k, tok_from)
    if hf_params != nemo_params:
        res.problems.append(f"parameter counts differ: HF {hf_params}, NeMo {nemo_params}")
    for label, ids_, (la, ga), (lb, gb) in zip(labels, inputs, hf_runs, nemo_runs):
        diff, equal, top1, topk = _compare(la, lb, top_k)
        pr = PromptResult(label, ids_, diff, equal, top1, topk, ga, gb)
        if tok is not None:
            pr.hf_text, pr.nemo_text = tok.decode(ga), tok.decode(gb)
        res.prompts.append(pr)
        what = repr(label) if label is not None else f"ids {ids_}"
        if not (equal if atol == 0 else diff <= atol):
            res.problems.append(f"prompt {what}: logits differ by up to {diff:.6g} (atol {atol:g})")
        if atol == 0 and not pr.generation_match:
            res.problems.append(f"prompt {what}: greedy generations differ")
    return res


# ------------------------------------------------------------------------------ CLI

def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--ids {text!r} is not a list of integers", fix="write e.g. --ids '1 17 42'") from None


def _report(v: Validation, out: Any) -> None:
    w = out.write
    w(f"parameters: HF {v.hf_params:,}  NeMo {v.nemo_params:,} (stored: {v.nemo_stored_params:,})"
      f"  {'match' if v.hf_params == v.nemo_params else 'DIFFER'}\n")
    w(f"tokenizer: {v.tokenizer or 'none (token ids)'}\n")
    for p in v.prompts:
        w(f"\nprompt: {p.prompt!r}\n" if p.prompt is not None else f"\nprompt ids: {p.input_ids}\n")
        w(f"  logits: max |diff| {p.max_abs_diff:.6g} ({'bit-identical' if p.logits_equal else 'not identical'}), "
          f"top-1 agreement {p.top1_agreement:.1%}, top-{v.top_k} agreement {p.topk_agreement:.1%}\n")
        hf_out = (f"{p.hf_text!r} " if p.hf_text is not None else "") + str(p.hf_generated)
        nemo_out = (f"{p.nemo_text!r} " if p.nemo_text is not None else "") + str(p.nemo_generated)
        w(f"  HF   generates: {hf_out}\n  NeMo generates: {nemo_out}"
          f"{'' if p.generation_match else '   <- DIFFERENT'}\n")
    w("\n" + ("OK: the models agree" + (" bit-exactly" if v.atol == 0 else f" within atol {v.atol:g}")
              if v.ok else "MISMATCH:\n  " + "\n  ".join(v.problems)) + "\n")


def _cli(args: argparse.Namespace) -> int:
    v = validate(args.hf, args.nemo, prompts=args.prompt, ids=[_ids(t) for t in args.ids or ()],
                 max_new_tokens=args.max_new_tokens, top_k=args.top_k, atol=args.atol, dtype=args.dtype,
                 device=args.device, max_memory=args.max_memory)
    if args.json:
        print(json.dumps(v.to_json()))
    else:
        _report(v, sys.stdout)
    return 0 if v.ok else 1


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("validate", help="run the HF model and the NeMo checkpoint (through hfnemo's reader) on "
                                        "prompts: parameter counts, logits, greedy generations; exit 1 on mismatch")
    p.add_argument("hf", metavar="HF_DIR", help="HF model directory (or hf://ORG/NAME)")
    p.add_argument("nemo", metavar="NEMO", help="NeMo 2 checkpoint, NeMo 1 directory or .nemo, Megatron-LM checkpoint")
    p.add_argument("--prompt", action="append", help="a text prompt (repeatable; needs a tokenizer in either "
                                                     "checkpoint); default: two fixed sentences")
    p.add_argument("--ids", action="append", metavar="'ID ID ...'",
                   help="a prompt as token ids (repeatable); the default when there is no tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy generation length (default 16)")
    p.add_argument("--top-k", type=int, default=5, help="k of the top-k agreement (default 5)")
    p.add_argument("--atol", type=float, default=0.0,
                   help="largest logit difference accepted (default 0: bit-identical logits and generations)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32"],
                   help="auto: each model in its stored dtype; fp32: both in float32")
    p.add_argument("--device", default="cpu", help="where the models run (default cpu)")
    p.add_argument("--max-memory", default=None, help="budget of the export's streaming buffers (default 2GiB)")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks")
    p.set_defaults(tool=_cli)
