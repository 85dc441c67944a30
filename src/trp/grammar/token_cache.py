"""Disk cache of the per-tokenizer preparation of constrained decoding.

:func:`trp.grammar.constrained.vocab_of` (the text of every token) and
:func:`~trp.grammar.constrained.prepare_tokens` (the token classes) read every token of the
vocabulary: about 1.3 s at 150k tokens. Their results are saved here, keyed by what they are
computed from (the tokenizer or the token texts, the ids, and the source of the code computing
them: :func:`code_digest`), and loaded by later processes.

Files live in ``cache_dir`` (default: ``$TRP_CACHE_DIR``, else ``$XDG_CACHE_HOME/trp`` or
``~/.cache/trp``; under ``tokens/``), one safetensors file per entry whose header metadata holds
the full key and a json document of the non-tensor fields. A file whose key does not match, or
that cannot be read, is rebuilt (with a warning when it is unreadable); writes go to a temporary
file renamed into place, so readers never see half a file. ``TRP_CACHE_DIR=""`` (or
``cache_dir=False``) turns the disk cache off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "cache_root",
    "code_digest",
    "digest",
    "load_entry",
    "save_entry",
    "tokenizer_fingerprint",
]

# Bump when what is saved (or how it is computed) changes: old files then simply miss.
FORMAT = "trp-token-cache-1"


def cache_root(cache_dir: str | os.PathLike[str] | bool | None) -> Path | None:
    """The folder of cache files (None: the disk cache is off)."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        env = os.environ.get("TRP_CACHE_DIR")
        if env is not None:
            if not env.strip():
                return None
            return Path(env).expanduser() / "tokens"
        home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(home).expanduser() / "trp" / "tokens"
    return Path(cache_dir).expanduser() / "tokens"


def digest(*parts: object) -> str:
    """A sha256 hex digest of ``parts`` (strings and bytes as they are, others by repr)."""
    h = hashlib.sha256()
    for p in parts:
        b = p if isinstance(p, bytes) else (p if isinstance(p, str) else repr(p)).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@functools.cache
def code_digest(*objects: Any) -> str:
    """A digest of the source of the functions that compute an entry (and of the trp version),
    so changing how the texts or classes are computed invalidates what was saved before."""
    from trp.version import __version__

    parts: list[object] = [__version__]
    for obj in objects:
        try:
            parts.append(inspect.getsource(obj))
        except (OSError, TypeError):  # no source (a frozen install): the version stands for it
            parts.append(getattr(obj, "__qualname__", repr(obj)))
    return digest(*parts)


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A digest of everything the token texts are read from: the tokenizer's serialized model
    (vocabulary, merges, normalizer, pre-tokenizer, decoder), its added tokens, its length and
    the bos/eos/pad ids. None when the tokenizer cannot be fingerprinted (no disk cache)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if backend is not None:
            model = backend.to_str()
        else:  # a slow tokenizer: its vocabulary is the model
            model = repr(sorted(tokenizer.get_vocab().items()))
        added = sorted(
            (int(i), str(t), bool(getattr(t, "special", False)))
            for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        )
        ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        return digest(FORMAT, type(tokenizer).__name__, model, added, len(tokenizer), ids)
    except Exception:  # an unusual tokenizer just goes without a disk cache
        return None


def _path(root: Path, kind: str, key: str) -> Path:
    return root / f"{kind}-{key[:32]}.safetensors"


def load_entry(
    root: Path | None, kind: str, key: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and json fields saved under ``key`` (None: missing, stale or unreadable —
    the caller rebuilds; unreadable files warn)."""
    if root is None:
        return None
    path = _path(root, kind, key)
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("key") != key:
                return None  # another key under the same short name, or an old format: rebuild
            fields = json.loads(meta["fields"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # a corrupt cache file is rebuilt, never fatal
        warnings.warn(
            f"trp: ignoring unreadable token cache {path} ({type(err).__name__}: {err}); "
            "rebuilding it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return tensors, fields


def save_entry(
    root: Path | None,
    kind: str,
    key: str,
    tensors: dict[str, torch.Tensor],
    fields: dict[str, Any],
) -> None:
    """Save an entry atomically (a temporary file renamed into place); failures warn."""
    if root is None:
        return
    path = _path(root, kind, key)
    tmp = None
    try:
        from safetensors.torch import save_file

        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        meta = {"format": FORMAT, "key": key, "fields": json.dumps(fields)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
        tmp = None
    except Exception as err:  # a read-only or full disk only loses the cache
        warnings.warn(
            f"trp: could not write the token cache {path} ({type(err).__name__}: {err})",
            RuntimeWarning,
            stacklevel=3,
        )
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
