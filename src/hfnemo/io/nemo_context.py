"""The `context/` directory of a NeMo 2 checkpoint, written and read without NeMo or fiddle.

NeMo's importer (`ModelConnector.nemo_save` -> `TrainerContext.io_dump`) writes:
  io.json          fiddle's JSON of TrainerContext(model=<Model>(config, optim, tokenizer), trainer)
  model.yaml       the model with every constructor default filled in, keys sorted
  nemo_tokenizer/  the HF tokenizer files
  artifacts/generation_config.json  from GenerationConfig.save_pretrained
We rebuild the same object graph and serialize it the way fiddle does (post-order, metadata before
its owner, `<snake_case_name>_<n>` keys, `paths` listing every route to a shared value), so that
the files equal NVIDIA's (NeMo 2.5.3 + megatron-core 0.14). Reading trusts nothing: JSON and
yaml.safe_load only, and the YAML/JSON shapes are checked before use.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hfnemo.io.nemo_configs import (
    CONFIG_CLASSES,
    MODEL_INIT_DEFAULTS,
    OPTIMIZER_CONFIG_ARGS,
    OPTIMIZER_MODULE_DEFAULTS,
    TOKENIZER_FIELDS,
    PyCall,
    PyRef,
    config_fields,
)

try:
    from hfnemo.errors import CorruptCheckpoint
except ImportError:  # pragma: no cover - errors.py is owned elsewhere; keep this module importable
    class CorruptCheckpoint(ValueError):  # type: ignore[no-redef]
        """Fallback until hfnemo.errors exists."""

        def __init__(self, message: str, **_: object) -> None:
            super().__init__(message)

__all__ = ["TOKENIZER_FILES", "NemoContext", "PyRef", "read_context", "write_context"]

# What AutoTokenizer.save_pretrained can write; only these are copied into nemo_tokenizer/.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.tiktoken", "vocab.txt",
)
TOKENIZER_SUBDIR = "nemo_tokenizer"
GENERATION_CONFIG_PATH = Path("artifacts") / "generation_config.json"

_CONFIG = PyRef("fiddle._src.config", "Config")
_TRAVERSER_METADATA = PyRef("fiddle._src.config", "BuildableTraverserMetadata")
_FROM_PRETRAINED = PyRef("nemo.lightning.io.artifact.hf_auto", "from_pretrained")
_GENERATION_CONFIG = PyRef("transformers.generation.configuration_utils", "GenerationConfig")
_OPTIMIZER_CONFIG = PyRef("megatron.core.optimizer.optimizer_config", "OptimizerConfig")
_OPTIMIZER_MODULE = PyRef("nemo.lightning.pytorch.optim.megatron", "MegatronOptimizerModule")
_AUTO_TOKENIZER = PyRef("nemo.collections.common.tokenizers.huggingface.auto_tokenizer", "AutoTokenizer")
_STRATEGY = PyRef("nemo.lightning.pytorch.strategies.megatron_strategy", "MegatronStrategy")
_TRAINER = PyRef("nemo.lightning.pytorch.trainer", "Trainer")
_TRAINER_CONTEXT = PyRef("nemo.lightning.io.pl", "TrainerContext")
_BUILTIN = {t: PyRef("builtins", t.__name__) for t in (dict, tuple, list)}


# ---- the object graph ---------------------------------------------------------------------------
class _Call:
    """A fiddle.Config: `fn` called with keyword arguments (kept in constructor order)."""

    def __init__(self, fn: PyRef, args: list[tuple[str, object]]) -> None:
        self.fn, self.args = fn, args


class _Metadata:
    """fiddle's BuildableTraverserMetadata of a _Call (argument tags/history are always empty here)."""

    def __init__(self, call: _Call) -> None:
        self.items: list[tuple[str, object]] = [
            ("fn_or_cls", call.fn), ("argument_names", tuple(n for n, _ in call.args)),
            ("argument_tags", {}), ("argument_history", {}),
        ]


def _children(value: object) -> list[tuple[str, str, object]]:
    """(item label as fiddle reprs it, path suffix, child) for each child of a traversable value."""
    if isinstance(value, (_Call, _Metadata)):
        pairs = value.args if isinstance(value, _Call) else value.items
        return [(f"Attr(name={n!r})", f".{n}", v) for n, v in pairs]
    if isinstance(value, dict):
        return [(f"Key(key={k!r})", f"[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [(f"Index(index={i})", f"[{i}]", v) for i, v in enumerate(value)]
    return []


def _memoizable(value: object) -> bool:
    # fiddle (daglish.is_memoizable): everything but scalars and the empty tuple gets an object key
    return not isinstance(value, (bool, int, float, str, type(None))) and value != ()


def _snake(name: str) -> str:
    # fiddle's object-key hint: "MixtralConfig8x7B" -> "mixtral_config8x7_b"
    return re.sub(r"(?<=[^_A-Z])(?=[A-Z])", "_", name).lower()


class _FiddleJson:
    """Serializes a _Call graph the way fiddle._src.experimental.serialization.Serialization does."""

    def __init__(self, root: _Call) -> None:
        self._objects: dict[str, Any] = {}
        self._refcounts: dict[str, int] = {}
        self._memo: dict[int, str] = {}
        self._keep: list[object] = []  # temporaries stay alive so that their id()s stay unique
        self._paths: dict[object, list[str]] = {}
        self._collect(root, "<root>")
        root_json = self._serialize(root, ["<root>"])
        self.result = {"root": root_json, "objects": self._objects, "refcounts": self._refcounts,
                       "version": "0.0.1"}

    @staticmethod
    def _identity(value: object) -> object:
        # torch.float32, F.silu, ... are singletons, so equal PyRefs are one object to fiddle
        return value if isinstance(value, PyRef) else id(value)

    def _collect(self, value: object, path: str) -> None:
        if _memoizable(value):
            self._paths.setdefault(self._identity(value), []).append(path)
        for _, suffix, child in _children(value):
            self._collect(child, path + suffix)

    def _ref(self, key: str) -> dict[str, str]:
        self._refcounts[key] = self._refcounts.get(key, 0) + 1
        return {"type": "ref", "key": key}

    def _serialize(self, value: object, paths: list[str] | None) -> Any:
        if id(value) in self._memo:
            return self._ref(self._memo[id(value)])
        if paths is not None:
            paths = self._paths.get(self._identity(value), paths)
        if isinstance(value, PyRef):
            out: dict[str, Any] = {"type": "pyref", "module": value.module, "name": value.name}
        elif isinstance(value, (bool, int, float, str, type(None))):
            if paths is None:
                return value
            out = {"type": "leaf", "value": value}
        else:
            self._keep.append(value)
            items = [[label, self._serialize(child, None if paths is None else [p + sfx for p in paths])]
                     for label, sfx, child in _children(value)]
            if isinstance(value, _Call):
                metadata: object = _Metadata(value)
            elif isinstance(value, _Metadata):
                metadata = _TRAVERSER_METADATA
            else:
                metadata = tuple(value) if isinstance(value, dict) else None
            self._keep.append(metadata)
            out = {"type": self._type(value), "items": items, "metadata": self._serialize(metadata, None)}
        if paths is not None:
            out["paths"] = paths
        if not _memoizable(value) or isinstance(value, PyRef):
            return out
        name = next(f"{self._hint(value)}_{i}" for i in range(1, 1 << 30)
                    if f"{self._hint(value)}_{i}" not in self._objects)
        self._memo[id(value)] = name
        self._objects[name] = out
        return self._ref(name)

    @staticmethod
    def _type(value: object) -> dict[str, str]:
        ref = _CONFIG if isinstance(value, _Call) else (
            _TRAVERSER_METADATA if isinstance(value, _Metadata) else _BUILTIN[type(value)])
        return {"type": "pyref", "module": ref.module, "name": ref.name}

    @staticmethod
    def _hint(value: object) -> str:
        if isinstance(value, _Call):
            return _snake(value.fn.name)
        return "buildable_traverser_metadata" if isinstance(value, _Metadata) else type(value).__name__


# ---- model.yaml -------------------------------------------------------------------------------
def _to_yaml(value: object) -> Any:
    """A table/argument value as NeMo's YAML writer renders it."""
    if isinstance(value, (PyRef, PyCall)):
        return {"_call_": isinstance(value, PyCall), "_target_": value.target}
    if isinstance(value, _Call):
        return {"_target_": value.fn.target, **{k: _to_yaml(v) for k, v in value.args}}
    if isinstance(value, (list, tuple)):
        return [_to_yaml(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_yaml(v) for k, v in value.items()}
    return value


def _with_defaults(fn: PyRef, defaults: dict[str, object], args: list[tuple[str, object]]) -> dict:
    return {"_target_": fn.target, **{k: _to_yaml(v) for k, v in {**defaults, **dict(args)}.items()}}


# ---- writing ----------------------------------------------------------------------------------
def _ordered(names: list[str], args: list[tuple[str, object]], what: str) -> list[tuple[str, object]]:
    """Arguments in constructor order, as fiddle keeps them; unknown or repeated names are bugs."""
    seen = [n for n, _ in args]
    unknown = sorted(set(seen) - set(names))
    if unknown or len(set(seen)) != len(seen):
        raise ValueError(f"{what}: unknown or repeated arguments {unknown or seen}")
    return sorted(args, key=lambda kv: names.index(kv[0]))


def write_context(
    ctx_dir: Path,
    *,
    model_target: PyRef,
    config_target: PyRef,
    config_args: list[tuple[str, object]],
    tokenizer_dir: Path | None,
    generation_config: dict | None,
    tokenizer_args: list[tuple[str, object]] | None = None,
) -> None:
    """Write io.json, model.yaml, nemo_tokenizer/ and artifacts/ as NeMo's HF importer does.

    Args:
        ctx_dir: the checkpoint's `context/` directory (created if missing).
        model_target / config_target: e.g. PyRef("nemo.collections.llm.gpt.model.llama", "LlamaModel").
        config_args: the config's explicit constructor arguments: the importer's kwargs plus
            nemo_configs.STRATEGY_CONFIG_ARGS (any order; written in constructor order). Values are
            None/bool/int/float/str, PyRef, or lists of those. `generation_config` is added here when
            `generation_config` is given; pass ("generation_config", None) to record its absence.
        tokenizer_dir: HF directory whose tokenizer files go to nemo_tokenizer/ (None: no tokenizer).
        generation_config: the content of the HF generation_config.json, or None.
        tokenizer_args: AutoTokenizer arguments besides pretrained_model_name, e.g. trust_remote_code.
    """
    ctx_dir = Path(ctx_dir)
    if config_target.target not in CONFIG_CLASSES or model_target.target not in MODEL_INIT_DEFAULTS:
        raise ValueError(f"no table for {config_target.target} / {model_target.target} in nemo_configs")
    fields = config_fields(config_target.target)
    args = list(config_args)
    if generation_config is not None:
        # NeMo's artifact transform swaps the GenerationConfig for a lazy from_pretrained('./artifacts')
        args.append(("generation_config", _Call(_FROM_PRETRAINED, [
            ("auto_cls", _GENERATION_CONFIG), ("pretrained_model_name_or_path", "./artifacts")])))
    args = _ordered(list(fields), args, config_target.target)
    config = _Call(config_target, args)
    optim_config = _Call(_OPTIMIZER_CONFIG, list(OPTIMIZER_CONFIG_ARGS))
    optim = _Call(_OPTIMIZER_MODULE, [("config", optim_config)])
    tokenizer: _Call | None = None
    if tokenizer_dir is not None:
        tok_args = _ordered(list(TOKENIZER_FIELDS), [("pretrained_model_name", TOKENIZER_SUBDIR),
                                                      *(tokenizer_args or [])], "AutoTokenizer")
        tokenizer = _Call(_AUTO_TOKENIZER, tok_args)
    model = _Call(model_target, [("config", config), ("optim", optim), ("tokenizer", tokenizer)])
    # ckpt_async_save=False: the reference import ran on CPU, where NeMo must save synchronously
    strategy = _Call(_STRATEGY, [("ckpt_save_optimizer", False), ("ckpt_async_save", False),
                                 ("kwargs", {"always_save_context": True})])
    trainer = _Call(_TRAINER, [("accelerator", "cpu"), ("strategy", strategy), ("devices", 1)])
    root = _Call(_TRAINER_CONTEXT, [("model", model), ("trainer", trainer), ("extra", {})])

    model_yaml = {
        "_target_": model_target.target,
        "config": _with_defaults(config_target, fields, args),
        **{k: _to_yaml(v) for k, v in MODEL_INIT_DEFAULTS[model_target.target].items()},
        "optim": {"_target_": _OPTIMIZER_MODULE.target, "config": _to_yaml(optim_config),
                  **OPTIMIZER_MODULE_DEFAULTS},
        "tokenizer": None if tokenizer is None else _with_defaults(
            _AUTO_TOKENIZER, dict(TOKENIZER_FIELDS), tokenizer.args),
    }
    ctx_dir.mkdir(parents=True, exist_ok=True)
    (ctx_dir / "io.json").write_text(json.dumps(_FiddleJson(root).result))
    (ctx_dir / "model.yaml").write_text(yaml.safe_dump(model_yaml))  # sorted keys, like NeMo's
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), ctx_dir / TOKENIZER_SUBDIR)
    if generation_config is not None:
        (ctx_dir / "artifacts").mkdir(exist_ok=True)
        # byte-for-byte what GenerationConfig.to_json_string writes
        text = json.dumps(generation_config, indent=2, sort_keys=True) + "\n"
        (ctx_dir / GENERATION_CONFIG_PATH).write_text(text)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        raise ValueError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)


# ---- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NemoContext:
    """What a converter needs from `context/`; refs are plain strings such as 'torch.bfloat16'."""

    model_target: str
    config_target: str
    config: dict
    generation_config: dict | None
    tokenizer_dir: Path | None


def read_context(ctx_dir: Path, on_model_target: Callable[[str], object] | None = None) -> NemoContext:
    """Read `context/`: model.yaml (or, without it, io.json over the class defaults) and artifacts.

    ``on_model_target`` is called with the model class before class defaults are looked up, so that
    the caller can load the architecture module that registers its config classes."""
    ctx_dir = Path(ctx_dir)
    yaml_path, json_path = ctx_dir / "model.yaml", ctx_dir / "io.json"
    if yaml_path.is_file():
        model_target, config_target, config = _from_model_yaml(yaml_path)
    elif json_path.is_file():
        model_target, config_target, config = _from_io_json(json_path, on_model_target)
    else:
        raise CorruptCheckpoint("NeMo context has neither model.yaml nor io.json", file=ctx_dir,
                                fix="point at a NeMo 2 checkpoint directory (it holds context/ and weights/)")
    generation_config = None
    gen_path = ctx_dir / GENERATION_CONFIG_PATH
    if gen_path.is_file():
        try:
            generation_config = json.loads(gen_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpoint(f"generation_config.json is not JSON: {e}", file=gen_path) from None
        if not isinstance(generation_config, dict):
            raise CorruptCheckpoint("generation_config.json is not a JSON object", file=gen_path)
    tok_dir = ctx_dir / TOKENIZER_SUBDIR
    return NemoContext(model_target, config_target, config, generation_config,
                       tok_dir if tok_dir.is_dir() else None)


def _plain(value: object, where: Path) -> Any:
    """YAML data with `{_target_: X, _call_: bool}` refs collapsed to the string X."""
    if isinstance(value, dict):
        if set(value) == {"_target_", "_call_"} and isinstance(value["_target_"], str):
            return value["_target_"]
        if not all(isinstance(k, str) for k in value):
            raise CorruptCheckpoint("model.yaml has a non-string key", file=where)
        return {k: _plain(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CorruptCheckpoint(f"model.yaml holds a {type(value).__name__}, not plain data", file=where)


def _from_model_yaml(path: Path) -> tuple[str, str, dict]:
    try:
        doc = yaml.safe_load(path.read_text())  # never a loader that builds Python objects
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"model.yaml is not plain YAML: {e}", file=path,
                                fix="the file may be damaged or hostile; re-create the checkpoint") from None
    doc = _plain(doc, path)
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict) or not isinstance(doc.get("_target_"), str) \
            or not isinstance(config.get("_target_"), str):
        raise CorruptCheckpoint("model.yaml lacks `_target_` or a `config:` mapping with `_target_`",
                                file=path)
    config = dict(config)
    return doc["_target_"], config.pop("_target_"), config


def _from_io_json(path: Path, on_model_target: Callable[[str], object] | None = None) -> tuple[str, str, dict]:
    """Model/config classes and the config (class defaults overlaid with the explicit arguments)."""
    try:
        doc = json.loads(path.read_text())
        objects = doc["objects"]
        model = _io_object(objects, _io_item(_io_object(objects, doc["root"]), "model"))
        config = _io_object(objects, _io_item(model, "config"))
        model_target, config_target = _io_fn(objects, model), _io_fn(objects, config)
        args = {name: _io_value(objects, v, 0) for name, v in _io_items(config)}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
        raise CorruptCheckpoint(f"io.json is not a NeMo TrainerContext: {e!r}", file=path) from None
    if on_model_target is not None:
        on_model_target(model_target)
    if config_target not in CONFIG_CLASSES:
        raise CorruptCheckpoint(f"model.yaml is missing and config class {config_target} is not known",
                                file=path, fix="restore context/model.yaml from the original checkpoint")
    defaults = {k: _plain(_to_yaml(v), path) for k, v in config_fields(config_target).items()}
    return model_target, config_target, {**defaults, **args}


_LABEL = re.compile(r"(?:Attr\(name|Key\(key)='([^'\\]*)'\)")


def _io_object(objects: dict, ref: dict) -> dict:
    if ref.get("type") != "ref":
        raise ValueError(f"expected a ref, got {ref.get('type')!r}")
    return objects[ref["key"]]


def _io_items(obj: dict) -> Iterator[tuple[str, Any]]:
    for label, value in obj["items"]:
        m = _LABEL.fullmatch(label)
        if m is None:
            raise ValueError(f"unexpected item label {label!r}")
        yield m.group(1), value


def _io_item(obj: dict, name: str) -> dict:
    return dict(_io_items(obj))[name]


def _io_fn(objects: dict, obj: dict) -> str:
    fn = _io_item(_io_object(objects, obj["metadata"]), "fn_or_cls")
    return f"{fn['module']}.{fn['name']}"


def _io_value(objects: dict, value: Any, depth: int) -> Any:
    if depth > 32:  # a hostile file could nest (or cycle) refs without end
        raise ValueError("io.json nests too deeply")
    kind = value["type"]
    if kind == "leaf":
        return value["value"]
    if kind == "pyref":
        return f"{value['module']}.{value['name']}"
    obj = _io_object(objects, value)
    if obj["type"] == {"type": "pyref", "module": _CONFIG.module, "name": _CONFIG.name}:
        return {"_target_": _io_fn(objects, obj),
                **{k: _io_value(objects, v, depth + 1) for k, v in _io_items(obj)}}
    if obj["type"].get("name") == "dict":
        return {k: _io_value(objects, v, depth + 1) for k, v in _io_items(obj)}
    return [_io_value(objects, v, depth + 1) for _, v in obj["items"]]
