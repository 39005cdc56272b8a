"""Tests for eeserve.model.loader against transformers' own GGUF loader as the reference."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from eeserve.model.loader import (
    ALIASES,
    SOURCE_FILE,
    ModelFiles,
    alias_path,
    default_cache_dir,
    gguf_cache_path,
    load_config,
    load_eos_token_ids,
    load_state_dict,
    load_tokenizer,
    model_identity,
    resolve_model,
)

ALIAS = "smollm2-135m"
TEXT = "Hello world 🙂 你好"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": TEXT},
]


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    return alias_path(ALIAS)


@pytest.fixture(scope="session")
def fresh(tmp_path_factory: pytest.TempPathFactory, gguf_file: Path) -> tuple[ModelFiles, float]:
    """The default model converted into an empty cache, and how long that took (seconds)."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("EESERVE_CACHE_DIR", str(cache))
    try:
        start = time.perf_counter()
        files = resolve_model(ALIAS)
        elapsed = time.perf_counter() - start
    finally:
        mp.undo()
    assert files.path.is_relative_to(cache)
    return files, elapsed


@pytest.fixture(scope="session")
def files(fresh: tuple[ModelFiles, float]) -> ModelFiles:
    return fresh[0]


@dataclass(frozen=True)
class Reference:
    """What transformers' own GGUF loader makes of the file."""

    state: dict[str, torch.Tensor]  # HF name -> float32 tensor
    config: transformers.PretrainedConfig


@pytest.fixture(scope="session")
def reference(gguf_file: Path) -> Reference:
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) insists on `accelerate`, which eeserve
    # does not depend on; load_gguf_checkpoint is the same dequantize + un-permute code path.
    config = transformers.AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    loaded = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)
    state = {name: torch.as_tensor(w).float() for name, w in loaded["tensors"].items()}
    return Reference(state=state, config=config)


def test_fresh_conversion_layout(fresh: tuple[ModelFiles, float], gguf_file: Path) -> None:
    files, elapsed = fresh
    print(f"first load (conversion): {elapsed:.1f} s")
    assert files.name == ALIAS and files.source == ALIAS
    assert files.path == gguf_cache_path(gguf_file, files.path.parent.parent)
    names = {p.name for p in files.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads((files.path / SOURCE_FILE).read_text())["source"] == str(gguf_file)
    assert "chat_template" in json.loads((files.path / "tokenizer_config.json").read_text())
    # the GGUF's end-of-generation ids (this file names only EOS) for generation_config.json
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    eos = int(reader.fields["tokenizer.ggml.eos_token_id"].contents())
    assert "tokenizer.ggml.eot_token_id" not in reader.fields
    assert json.loads((files.path / "generation_config.json").read_text())["eos_token_id"] == [eos]
    leftovers = [p for p in files.path.parent.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_second_resolve_is_fast(files: ModelFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EESERVE_CACHE_DIR", str(files.path.parent.parent))
    start = time.perf_counter()
    again = resolve_model(ALIAS)
    elapsed = time.perf_counter() - start
    print(f"second load: {elapsed:.4f} s")
    assert again == files
    assert elapsed < 5.0


def test_state_dict_matches_transformers(files: ModelFiles, reference: Reference) -> None:
    ours = load_state_dict(files)
    theirs = reference.state
    assert len(ours) == 2 + 9 * 30  # embed, final norm, 9 tensors per layer; lm_head is tied
    assert "lm_head.weight" not in ours
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, theirs[name]), name
    assert set(theirs) <= set(ours) | {"lm_head.weight"}


def test_config_matches_transformers(files: ModelFiles, reference: Reference) -> None:
    ours, theirs = load_config(files), reference.config
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"] == 100000.0
    assert ours.model_type == "llama" and ours.architectures == ["LlamaForCausalLM"]
    assert (ours.num_hidden_layers, ours.hidden_size, ours.vocab_size) == (30, 576, 49152)


def test_tokenizer_round_trip(files: ModelFiles, gguf_file: Path) -> None:
    ours = load_tokenizer(files)
    theirs = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert ours.encode(TEXT) == theirs.encode(TEXT)
    assert ours.decode(ours.encode(TEXT, add_special_tokens=False)) == TEXT
    kwargs = {"tokenize": False, "add_generation_prompt": True}
    assert ours.apply_chat_template(MESSAGES, **kwargs) == theirs.apply_chat_template(
        MESSAGES, **kwargs
    )


def test_model_identity(files: ModelFiles) -> None:
    identity = model_identity(files)
    assert json.loads(json.dumps(identity)) == identity
    assert identity["architecture"] == "LlamaForCausalLM"
    assert (identity["num_layers"], identity["hidden_size"], identity["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert len(identity["fingerprint"]) == 16


def test_hf_folder_returned_as_is(files: ModelFiles) -> None:
    again = resolve_model(str(files.path))
    assert again.path == files.path and again.name == files.path.name


def test_gguf_path_uses_cache(files: ModelFiles, gguf_file: Path) -> None:
    again = resolve_model(str(gguf_file), cache_dir=files.path.parent.parent)
    assert again.path == files.path
    assert again.name == gguf_file.stem


def test_unknown_alias_lists_aliases() -> None:
    with pytest.raises(ValueError, match=ALIAS) as err:
        resolve_model("no-such-model")
    assert ".gguf" in str(err.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=ALIAS):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_folder_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors"):
        resolve_model(str(tmp_path))


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EESERVE_CACHE_DIR", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("EESERVE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "eeserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "eeserve"


def test_aliases_table() -> None:
    assert ALIAS in ALIASES


def test_unsupported_gguf_architecture_leaves_no_cache(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        resolve_model(str(path), cache_dir=cache)
    assert list((cache / "models").iterdir()) == []


def test_cache_entry_is_not_owner_only(files: ModelFiles) -> None:
    assert files.path.stat().st_mode & 0o055 == 0o055
    assert (files.path / "model.safetensors").stat().st_mode & 0o044 == 0o044


def test_eos_token_ids_from_every_source(tmp_path: Path) -> None:
    from types import SimpleNamespace

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 5]}))
    files = ModelFiles(name="x", path=tmp_path, source="x")
    assert load_eos_token_ids(files, SimpleNamespace(eos_token_id=9)) == (9, 2, 7, 5)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["<eos>"]}))
    with pytest.raises(ValueError, match="eos_token_id in .*generation_config.json must be a token id"):
        load_eos_token_ids(files, SimpleNamespace(eos_token_id=None))
