"""Sources on the Hugging Face Hub: ``hf://ORG/NAME`` (and a bare ``ORG/NAME`` that is no local path).

The guide's first step, ``huggingface-cli download ORG/NAME``, done by huggingface_hub's own cache:
``snapshot_download`` of the files a conversion reads (safetensors shards and index, config.json,
generation_config.json, tokenizer files; never ``*.bin``/``*.pth``), into the standard cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), with ``HF_TOKEN``
for gated models. ``HF_HUB_OFFLINE=1`` resolves from the cache only. The snapshot directory is
then an ordinary HF model directory.

What is local stays local, as before: ``hf:///abs/path``, ``hf://rel/dir`` and ``rel/dir`` that
exist on disk are paths. ``ORG/NAME@REVISION`` picks a branch, tag or commit.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from hfnemo.errors import UsageError
from hfnemo.io.hf import TOKENIZER_FILES

SCHEME = "hf://"
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  *TOKENIZER_FILES]
# huggingface_hub's repo id rule: [namespace/]name of letters, digits, '-', '_', '.'; no '--' or '..'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_TRUTHY = {"1", "on", "yes", "true"}


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment now (not at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def is_repo_id(text: str) -> bool:
    name = text.split("@", 1)[0]
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name and not name.endswith(".")


def resolve_source(src: str | os.PathLike) -> Path:
    """A local path for ``src``: itself when it exists (or is not hub-shaped), else a Hub snapshot.

    ``hf://`` is stripped (``hf:///abs`` is the absolute path ``/abs``); what remains is a local
    path when it exists, and a Hub model id (``ORG/NAME[@REVISION]``) otherwise."""
    text = os.fspath(src)
    explicit = text.startswith(SCHEME)
    rest = text[len(SCHEME):] if explicit else text
    path = Path(rest).expanduser()
    if path.exists() or rest.startswith(("/", ".", "~")) or not is_repo_id(rest):
        if explicit and not path.exists() and not rest.startswith(("/", ".", "~")):
            raise UsageError(f"{text}: {rest!r} is neither a local directory nor a Hub model id (ORG/NAME)",
                             file=rest, fix="check the path, or write the Hub id as hf://ORG/NAME")
        return path
    return download(rest)


def download(repo: str) -> Path:
    """The snapshot directory of Hub model ``repo`` (``ORG/NAME[@REVISION]``), downloaded into the
    cache unless already there; offline, from the cache only."""
    repo_id, _, revision = repo.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:  # pragma: no cover - installed with transformers
        raise UsageError(f"{repo} is not a local directory, and huggingface_hub is not installed to fetch it",
                         file=repo, fix="pip install 'hfnemo[hub]', or download the model and pass its directory")
    cache = cache_dir()
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    where = cache / ("models--" + repo_id.replace("/", "--"))
    try:
        path = snapshot_download(repo_id, revision=revision or None, cache_dir=str(cache), token=token,
                                 local_files_only=offline(), allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError:
        if offline():
            raise UsageError(f"{repo} is not a local directory and HF_HUB_OFFLINE=1, and the Hub cache has no "
                             f"snapshot of it", file=where,
                             fix=f"download it first where the network is reachable (`huggingface-cli download "
                                 f"{repo_id}`, with the same HF_HOME/HF_HUB_CACHE), unset HF_HUB_OFFLINE, or "
                                 "pass the model's local directory") from None
        raise UsageError(f"{repo} is not a local directory, and the Hub cannot be reached to download it",
                         file=where, fix="check the network (or HF_ENDPOINT), or pass the model's local directory") from None
    except GatedRepoError:
        raise UsageError(f"{repo_id} is a gated model and this token has no access", file=where,
                         fix="accept its license on huggingface.co and set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{repo} is neither a local directory nor a Hub model this token can see", file=repo,
                         fix="check the path or the model id; private models need HF_TOKEN") from None
    except RevisionNotFoundError:
        raise UsageError(f"{repo}: the Hub model has no revision {revision!r}", file=where,
                         fix="use a branch, tag or commit that exists (default: main)") from None
    return Path(path)
