"""The GGUF conversion cache is keyed by content, and a damaged GGUF file is refused by name."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from eeserve.model.gguf_file import DIGEST_DIR, cache_entry, check_gguf_source, content_digest, open_gguf
from eeserve.model.loader import alias_path, default_cache_dir, resolve_model


def test_digest_is_the_sha256_and_is_memoized(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    data = bytes(range(256)) * 40000  # spans several read chunks
    f.write_bytes(data)
    cache = tmp_path / "cache"
    assert content_digest(f, cache) == hashlib.sha256(data).hexdigest()
    memos = list((cache / DIGEST_DIR).iterdir())
    assert len(memos) == 1
    assert json.loads(memos[0].read_text())["sha256"] == hashlib.sha256(data).hexdigest()
    # the memo is what a second call reads: a (path, size, mtime) hit does not rehash
    memo = json.loads(memos[0].read_text())
    memos[0].write_text(json.dumps({**memo, "sha256": "0" * 64}))
    assert content_digest(f, cache) == "0" * 64


def test_cache_entry_follows_content_not_path(tmp_path: Path) -> None:
    a, b = tmp_path / "one" / "m.gguf", tmp_path / "two" / "other-name.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"GGUF" + b"\x00" * 1000)
    cache = tmp_path / "cache"
    assert cache_entry(a, cache) == cache_entry(b, cache)
    b.write_bytes(b"GGUF" + b"\x00" * 999 + b"\x01")  # one byte differs
    assert cache_entry(a, cache) != cache_entry(b, cache)


def test_a_copy_of_the_model_reuses_the_converted_folder(tmp_path: Path, model_files) -> None:
    # another venv's copy of the package file: same bytes, other path, other mtime
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(alias_path("smollm2-135m"), copy)
    before = sorted((default_cache_dir() / "models").iterdir())
    files = resolve_model(str(copy))
    assert files.path == model_files.path
    assert sorted((default_cache_dir() / "models").iterdir()) == before


@pytest.fixture(scope="module")
def gguf_bytes() -> bytes:
    return alias_path("smollm2-135m").read_bytes()


@pytest.mark.parametrize("keep", [5000, -4096], ids=["in-header", "in-tensor-data"])
def test_truncated_gguf_is_named(tmp_path: Path, gguf_bytes: bytes, keep: int) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_bytes[:keep])
    with pytest.raises(ValueError, match=r"cut\.gguf.*(truncated|not a complete GGUF file)"):
        open_gguf(bad)
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        check_gguf_source(bad, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        resolve_model(str(bad), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_text_file_named_gguf_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am text\n")
    with pytest.raises(ValueError, match=r"notes\.gguf.* is not a GGUF file"):
        resolve_model(str(bad), cache_dir=tmp_path / "cache")
