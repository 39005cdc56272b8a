"""Exit heads: map the residual-stream hidden state after e layers to next-token logits.

Head types (docs/design.md section 2):
- ``shared``: the model's final RMSNorm + LM head (LayerSkip, Elhoushi et al. 2024, arXiv
  2404.16710; EE-LLM's shared output embedding, Chen et al. 2023, arXiv 2312.04916).
- ``adapter``: a learned residual map ``h + W·RMSNorm_a(h) + b`` in front of the shared head
  (a "tuned lens", Belrose et al. 2023, arXiv 2303.08112); zero-initialised, so it starts as the
  shared head.
- ``mlp``: a learned residual SwiGLU block ``h + W_down(silu(W_g x) * W_u x)``, ``x =
  RMSNorm_a(h)``, hidden size ``head_hidden``, in front of the shared head (EE-Tuning's "MLP"
  exit architecture, Pan et al. 2024, arXiv 2402.00518, section 2.1); ``W_down`` starts at zero,
  so it too starts as the shared head.
- ``untied``: a per-exit RMSNorm and LM head (EE-LLM's untied exits).
Any head may carry a ``classifier`` whose sigmoid estimates P(this exit's top-1 == the final
layer's top-1) from ``h / rms(h)`` (CALM's learned early-exit classifier, Schuster et al. 2022,
arXiv 2207.07061, section 3.5): a linear probe (``classifier_hidden`` 0) or a one-hidden-layer
GELU MLP. With ``classifier_vocab`` K > 0 the probe sees five statistics of the exit head's
logits over K candidate ids (the tokens most often predicted by the final layer in the tuning
data): top-1 and top-2 probability, entropy, max logit and log-sum-exp over the candidates. That
gives the cheap probe what the softmax response sees, at 2·H·K FLOPs instead of 2·H·V.
``classifier_hidden_state`` says whether it also sees the hidden state (a probe on those five
statistics alone, fitted on rows the heads were not trained on, ranks tokens as well as the
full softmax response: docs/exit_heads.md).

On disk (a folder): ``exit_heads.safetensors`` with tensors ``exits.<e>.<name>`` and
``exit_config.json`` with ``exit_layers``, ``head_type``, ``head_hidden``, ``has_classifier``,
``classifier_hidden``, ``classifier_vocab``, ``classifier_hidden_state``, ``base_model`` (``loader.model_identity``) and an optional ``serving`` part
(policy, confidence, thresholds).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from eeserve.config import EXIT_HEAD_TYPES as HEAD_TYPES
from eeserve.model.llama import LlamaModel, linear, rms_norm

FORMAT_VERSION = 1
NUM_VOCAB_FEATURES = 5  # candidate-logit statistics fed to the classifier


@dataclass(frozen=True)
class HeadSpec:
    """What every head of one ``ExitHeads`` is made of; saved in exit_config.json.

    Fields that do not apply are stored as 0 / False (``head_hidden`` unless ``mlp``, the
    ``classifier_*`` sizes without a classifier), so two specs that build the same heads are equal.

    Attributes:
        head_type: one of ``HEAD_TYPES``.
        head_hidden: hidden size of an ``mlp`` head.
        classifier: each head carries a classifier confidence probe.
        classifier_hidden: 0 for a linear probe, else the hidden size of an MLP probe.
        classifier_vocab: 0, or the number K of candidate ids whose logits feed the probe.
        classifier_hidden_state: the probe also sees ``h / rms(h)`` (True without a classifier:
            a probe without candidate logits must).

    Raises:
        ValueError: an unknown head type, a non-positive ``head_hidden`` for ``mlp``, a negative
            size, or a probe with no inputs.
    """

    head_type: str
    head_hidden: int = 0
    classifier: bool = False
    classifier_hidden: int = 0
    classifier_vocab: int = 0
    classifier_hidden_state: bool = True

    def __post_init__(self) -> None:
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {self.head_type!r}")
        if self.head_type == "mlp" and self.head_hidden <= 0:
            raise ValueError(f"head_hidden must be a positive size for an mlp head, got {self.head_hidden}")
        if self.classifier_hidden < 0 or self.classifier_vocab < 0:
            raise ValueError(f"classifier_hidden and classifier_vocab must be >= 0, got "
                             f"{self.classifier_hidden} and {self.classifier_vocab}")
        fix = object.__setattr__
        fix(self, "head_hidden", self.head_hidden if self.head_type == "mlp" else 0)
        fix(self, "classifier_hidden", self.classifier_hidden if self.classifier else 0)
        fix(self, "classifier_vocab", self.classifier_vocab if self.classifier else 0)
        fix(self, "classifier_hidden_state", bool(self.classifier_hidden_state or not self.classifier))
        if not (self.classifier_hidden_state or self.classifier_vocab):
            raise ValueError("a classifier probe without the hidden state needs candidate logits: "
                             "classifier_vocab must be in 2..V")

    def to_json(self) -> dict[str, Any]:
        """The exit_config.json keys of the spec (``classifier`` is saved as ``has_classifier``)."""
        d = asdict(self)
        d["has_classifier"] = d.pop("classifier")
        return d

    @classmethod
    def from_json(cls, cfg: dict[str, Any]) -> HeadSpec:
        """Read the keys written by ``to_json`` (absent ones take their defaults)."""
        return cls(cfg.get("head_type"), int(cfg.get("head_hidden", 0)), bool(cfg.get("has_classifier", False)),
                   int(cfg.get("classifier_hidden", 0)), int(cfg.get("classifier_vocab", 0)),
                   bool(cfg.get("classifier_hidden_state", True)))


class ExitHead(nn.Module):
    """One exit point's head. Shared, adapter and mlp heads map h to the input of the model's final
    norm and LM head; untied heads own their norm and LM head.

    Args:
        spec: what the head is made of.
        hidden_size, vocab_size, eps: the backbone's H, V and RMSNorm epsilon.

    Raises:
        ValueError: a ``spec.classifier_vocab`` outside {0} and 2..V.
    """

    def __init__(self, spec: HeadSpec, hidden_size: int, vocab_size: int, eps: float,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec = spec
        self.eps = eps
        h = hidden_size
        if spec.head_type == "adapter":
            self.norm = nn.Parameter(torch.ones(h, dtype=dtype))
            self.proj = nn.Linear(h, h, bias=True, dtype=dtype)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        elif spec.head_type == "mlp":
            self.norm = nn.Parameter(torch.ones(h, dtype=dtype))
            self.gate_up = nn.Linear(h, 2 * spec.head_hidden, bias=False, dtype=dtype)
            nn.init.normal_(self.gate_up.weight, std=h**-0.5)
            self.down = nn.Linear(spec.head_hidden, h, bias=False, dtype=dtype)
            nn.init.zeros_(self.down.weight)
        elif spec.head_type == "untied":
            self.norm = nn.Parameter(torch.ones(h, dtype=dtype))
            self.lm_head_w = nn.Parameter(torch.empty(vocab_size, h, dtype=dtype))  # [V, H], like the model's
        if spec.classifier_vocab and not 2 <= spec.classifier_vocab <= vocab_size:
            raise ValueError(f"classifier_vocab must be 0 or in 2..{vocab_size}, got {spec.classifier_vocab}")
        if spec.classifier_vocab:
            self.register_buffer("candidate_ids", torch.arange(spec.classifier_vocab, dtype=torch.long))
        self._columns: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (W, ids, W[ids])
        d_in = self.classifier_inputs_size(h)
        self.classifier: nn.Module | None = None
        if spec.classifier and spec.classifier_hidden > 0:
            self.classifier = nn.Sequential(nn.Linear(d_in, spec.classifier_hidden, dtype=dtype), nn.GELU(),
                                            nn.Linear(spec.classifier_hidden, 1, dtype=dtype))
        elif spec.classifier:
            self.classifier = nn.Linear(d_in, 1, dtype=dtype)
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def normed(self, model: LlamaModel, h: torch.Tensor) -> torch.Tensor:
        """h: [N, H] residual stream -> [N, H] input of the LM head matrix. The products go through
        ``linear``: a decode-time check runs on a few rows."""
        if self.spec.head_type == "untied":
            return rms_norm(h, self.norm, self.eps)
        if self.spec.head_type == "adapter":
            h = h + linear(rms_norm(h, self.norm, self.eps), self.proj.weight) + self.proj.bias
        elif self.spec.head_type == "mlp":
            gate, up = linear(rms_norm(h, self.norm, self.eps), self.gate_up.weight).chunk(2, dim=-1)
            h = h + linear(F.silu(gate) * up, self.down.weight)
        return model.final_norm(h)

    def transform_flops(self, hidden_size: int) -> float:
        """FLOPs per token of the map in front of the LM head (0 for shared and untied heads)."""
        if self.spec.head_type == "adapter":
            return 2.0 * hidden_size * hidden_size
        if self.spec.head_type == "mlp":
            return 6.0 * hidden_size * self.spec.head_hidden
        return 0.0

    def classifier_inputs_size(self, hidden_size: int) -> int:
        """Width of the probe's input: H (hidden state) and/or the candidate-logit statistics."""
        spec = self.spec
        return (hidden_size if spec.classifier_hidden_state else 0) + (NUM_VOCAB_FEATURES if spec.classifier_vocab else 0)

    def classifier_flops(self, hidden_size: int) -> float:
        """FLOPs per token of one classifier check (with candidate logits: the head's transform and
        a K-column product too)."""
        c = self.spec.classifier_hidden
        d_in = self.classifier_inputs_size(hidden_size)
        flops = 2.0 * d_in * c + 2.0 * c if c else 2.0 * d_in
        if self.spec.classifier_vocab:
            flops += self.transform_flops(hidden_size) + 2.0 * hidden_size * self.spec.classifier_vocab
        return flops

    def head_weight(self, model: LlamaModel) -> torch.Tensor:
        """[V, H] LM head used by this exit (``linear``'s layout)."""
        return self.lm_head_w if self.spec.head_type == "untied" else model.lm_head_w

    def logits(self, model: LlamaModel, h: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the full vocabulary ([N, V]) or, with ``ids`` [N, K], of those ids only ([N, K])."""
        x = self.normed(model, h)
        w = self.head_weight(model)
        if ids is None:
            return linear(x, w).float()
        cols = w[ids]  # [N, K, H]
        return torch.bmm(cols, x.unsqueeze(-1)).squeeze(-1).float()  # [N, K]

    def classifier_prob(self, h: torch.Tensor, model: LlamaModel) -> torch.Tensor:
        """[N, H] -> [N] probability that this exit agrees with the final layer.

        Raises:
            ValueError: when the head has no classifier.
        """
        return self.classifier_check(h, model)[0]

    def classifier_check(self, h: torch.Tensor, model: LlamaModel) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``classifier_prob`` and the candidate logits it was computed from.

        Returns:
            ([N] probability, [N, K] float32 logits of ``candidate_ids`` or None without
            ``classifier_vocab``).

        Raises:
            ValueError: when the head has no classifier.
        """
        if self.classifier is None:
            raise ValueError("confidence 'classifier' needs exit heads trained with a classifier (eeserve tune)")
        x, logits = self._classifier_inputs(model, h)
        return torch.sigmoid(self.classifier(x).squeeze(-1).float()), logits

    def classifier_inputs(self, model: LlamaModel, h: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, D] the probe's input (``classifier_inputs_size``), in its dtype: h / rms(h)
        (with ``classifier_hidden_state``), then (with ``classifier_vocab``) the candidate-logit
        statistics."""
        return self._classifier_inputs(model, h)[0]

    def _classifier_inputs(self, model: LlamaModel, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = []
        logits = None
        if self.spec.classifier_hidden_state:
            parts.append(h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self.eps))
        if self.spec.classifier_vocab:
            logits = linear(self.normed(model, h), self._candidate_rows(model)).float()  # [N, K]
            logp = torch.log_softmax(logits, dim=-1)
            top2 = logp.exp().topk(2, dim=-1).values
            ent = -(logp.exp() * logp).sum(-1)
            parts.append(torch.stack([top2[:, 0], top2[:, 1], ent / 5.0, logits.max(-1).values / 20.0,
                                      torch.logsumexp(logits, -1) / 20.0], dim=-1))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return x.to(next(self.classifier.parameters()).dtype), logits

    def set_candidates(self, ids: torch.Tensor) -> None:
        """Set the K candidate ids ([K] int64) whose logits feed the probe."""
        self.candidate_ids.copy_(ids)
        self._columns = None

    def _candidate_rows(self, model: LlamaModel) -> torch.Tensor:
        """[K, H] rows of the head weight for the candidate ids, cached."""
        w = self.head_weight(model)
        c = self._columns
        if c is None or c[0] is not w or c[1] is not self.candidate_ids or c[2].dtype != w.dtype:
            self._columns = c = (w, self.candidate_ids, w[self.candidate_ids].contiguous())
        return c[2]


class ExitHeads(nn.Module):
    """The heads of all exit points of one model.

    Args:
        exit_layers: exit points (layer counts).
        head_type: one of ``HEAD_TYPES``.
        model: the backbone (shapes; and initial values of untied heads: copies of the final head).
        classifier, head_hidden, classifier_hidden, classifier_vocab, classifier_hidden_state: the
            rest of the heads' ``HeadSpec``.

    Raises:
        ValueError: as ``HeadSpec`` and ``ExitHead``.
    """

    def __init__(self, exit_layers: tuple[int, ...], head_type: str, model: LlamaModel, classifier: bool = False,
                 head_hidden: int = 0, classifier_hidden: int = 0, classifier_vocab: int = 0,
                 classifier_hidden_state: bool = True) -> None:
        super().__init__()
        a = model.args
        self.exit_layers = tuple(exit_layers)
        self.spec = HeadSpec(head_type, head_hidden, classifier, classifier_hidden, classifier_vocab,
                             classifier_hidden_state)
        self.heads = nn.ModuleDict(
            {str(e): ExitHead(self.spec, a.hidden_size, a.vocab_size, a.rms_norm_eps, model.dtype)
             for e in self.exit_layers}
        )
        if head_type == "untied":
            with torch.no_grad():
                for head in self.heads.values():
                    head.norm.copy_(model.norm_weight)
                    head.lm_head_w.copy_(model.lm_head_w)

    def __getitem__(self, exit_layer: int) -> ExitHead:
        return self.heads[str(exit_layer)]

    def save(self, folder: str | Path, base_model: dict[str, Any], serving: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """Write exit_heads.safetensors + exit_config.json into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"exits.{e}.{k}": v.detach().contiguous().cpu() for e, head in self.heads.items()
                   for k, v in head.state_dict().items()}
        if tensors:
            save_file(tensors, str(folder / "exit_heads.safetensors"))
        cfg = {
            "format_version": FORMAT_VERSION,
            "exit_layers": list(self.exit_layers),
            **self.spec.to_json(),
            "base_model": base_model,
            "serving": serving or {},
            **(extra or {}),
        }
        (folder / "exit_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, model: LlamaModel, base_model: dict[str, Any],
             exit_layers: tuple[int, ...] | None = None) -> ExitHeads:
        """Load heads made for ``model``.

        Args:
            exit_layers: the exit points wanted (default: all in the folder); each must be in it.

        Raises:
            FileNotFoundError: missing files.
            ValueError: heads made for another base model, wrong shapes, or exit layers not in
                the folder; the message says which.
        """
        folder = Path(folder)
        cfg_path, st_path = folder / "exit_config.json", folder / "exit_heads.safetensors"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"exit heads folder {str(folder)!r} has no exit_config.json")
        cfg = json.loads(cfg_path.read_text())
        theirs = cfg.get("base_model", {})
        for key in ("architecture", "num_layers", "hidden_size", "vocab_size", "fingerprint"):
            if key in theirs and key in base_model and theirs[key] != base_model[key]:
                raise ValueError(
                    f"exit heads in {str(folder)!r} were made for another base model: {key} is "
                    f"{theirs[key]!r} there but {base_model[key]!r} for the loaded model"
                )
        available = tuple(cfg["exit_layers"])
        wanted = tuple(exit_layers) if exit_layers else available
        missing = [e for e in wanted if e not in available]
        if missing:
            raise ValueError(f"exit_layers {missing} have no trained head in {str(folder)!r}; available: {list(available)}")
        try:
            spec = HeadSpec.from_json(cfg)
        except ValueError as e:
            raise ValueError(f"exit heads in {str(folder)!r}: {e}") from None
        heads = cls(wanted, spec.head_type, model, spec.classifier, spec.head_hidden, spec.classifier_hidden,
                    spec.classifier_vocab, spec.classifier_hidden_state)
        if spec.head_type != "shared" or spec.classifier:
            if not st_path.is_file():
                raise FileNotFoundError(f"exit heads folder {str(folder)!r} has no exit_heads.safetensors")
            tensors = load_file(str(st_path))
            for e in wanted:
                head = heads[e]
                state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"exits.{e}.")}
                if "lm_head_t" in state:  # untied heads saved before the [V, H] layout: [H, V]
                    state["lm_head_w"] = state.pop("lm_head_t").t()
                mine = head.state_dict()
                for k, v in mine.items():
                    if k not in state:
                        raise ValueError(f"exit heads file lacks tensor exits.{e}.{k}")
                    if tuple(state[k].shape) != tuple(v.shape):
                        raise ValueError(
                            f"exit heads tensor exits.{e}.{k} has shape {tuple(state[k].shape)}, "
                            f"the loaded model needs {tuple(v.shape)}"
                        )
                head.load_state_dict({k: state[k].to(v.dtype) for k, v in mine.items()})
        heads.to(model.device)
        heads.requires_grad_(False)
        return heads
