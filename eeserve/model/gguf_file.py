"""A GGUF file on disk: its content key and a structural check, without torch or transformers.

Both run before a model loads (the CLI checks ``--model`` with them before it imports torch), so a
wrong file is refused in about a second, with its name in the message.

The content key names the conversion cache entry: the same bytes share one cached Hugging Face
folder whatever path (or virtual environment) they are reached through. The full sha256 is
computed once per (path, size, mtime) and remembered in ``<cache_dir>/gguf-digests/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

GGUF_MAGIC = b"GGUF"
DIGEST_DIR = "gguf-digests"  # under the cache root: (path, size, mtime) -> content sha256
_CHUNK = 1 << 22  # bytes read at a time while hashing


def default_cache_dir() -> Path:
    """Return the folder that holds converted models.

    Returns:
        ``$EESERVE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/eeserve``, else
        ``~/.cache/eeserve``.
    """
    if os.environ.get("EESERVE_CACHE_DIR"):
        return Path(os.environ["EESERVE_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "eeserve"
    return Path.home() / ".cache" / "eeserve"


def cache_entry(gguf_path: Path, cache_dir: Path) -> Path:
    """Return the conversion cache folder of a GGUF file (it may not exist yet).

    Args:
        gguf_path: the GGUF file.
        cache_dir: the cache root.

    Returns:
        ``<cache_dir>/models/gguf-<first 20 hex digits of the file's sha256>``.
    """
    return Path(cache_dir) / "models" / f"gguf-{content_digest(gguf_path, cache_dir)[:20]}"


def content_digest(gguf_path: Path, cache_dir: Path | None = None) -> str:
    """Return the sha256 (hex) of a file's bytes, memoized by (resolved path, size, mtime).

    Args:
        gguf_path: the file.
        cache_dir: the cache root that holds the memo; None computes without remembering.

    Returns:
        64 hex digits.

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(gguf_path).resolve()
    stat = path.stat()
    memo: Path | None = None
    if cache_dir is not None:
        stamp = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
        memo = Path(cache_dir) / DIGEST_DIR / (hashlib.sha256(stamp.encode()).hexdigest()[:24] + ".json")
        try:
            known = json.loads(memo.read_text())
            if known.get("path") == str(path) and known.get("size") == stat.st_size:
                return str(known["sha256"])
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        _write_atomic(memo, json.dumps({"path": str(path), "size": stat.st_size, "sha256": digest}) + "\n")
    return digest


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only loses the memo; the digest is recomputed next time


def open_gguf(gguf_path: Path):
    """Open a GGUF file for reading, refusing one that is not a complete GGUF file, naming it.

    Reads the header, the metadata and the tensor table (about 3 s for the default model: the
    vocabulary is metadata) and checks that every tensor's bytes lie inside the file.

    Args:
        gguf_path: the file.

    Returns:
        The ``gguf.GGUFReader`` over the file (tensors memory-mapped, not read).

    Raises:
        ValueError: the file is not GGUF (wrong magic), or is truncated or corrupt; the message
            names the file and its size.
    """
    path = Path(gguf_path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{str(path)!r} is not a GGUF file: it starts with {magic!r}, a GGUF file starts with {GGUF_MAGIC!r}"
        )
    import gguf  # numpy only; the metadata parser

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parser failure means a damaged file
        raise ValueError(
            f"{str(path)!r} is not a complete GGUF file ({size} bytes; truncated or corrupt: {e})"
        ) from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=reader.data_offset)
    if end > size:
        raise ValueError(f"{str(path)!r} is truncated: its tensors need {end} bytes, the file has {size}")
    return reader


def check_gguf_source(gguf_path: Path, cache_dir: Path) -> None:
    """Before a model loads: refuse a GGUF file that would fail conversion, naming it.

    A file whose content is already converted in ``cache_dir`` passes at the cost of its digest
    (memoized); any other file is parsed by ``open_gguf``.

    Args:
        gguf_path: the GGUF file.
        cache_dir: the cache root.

    Raises:
        ValueError: as ``open_gguf``.
        OSError: the file cannot be read.
    """
    if not cache_entry(gguf_path, cache_dir).is_dir():
        open_gguf(gguf_path)
