"""Turns a ``SchedulerOutput`` into model inputs, runs the layers (with exit checks when early
exit is on), and samples."""

from __future__ import annotations

import torch

from eeserve.core.interfaces import ModelRunnerOutput, SampledToken, SchedulerOutput
from eeserve.early_exit.executor import ExitExecutor
from eeserve.model.kv_cache import KVCache
from eeserve.model.llama import LlamaModel
from eeserve.request import Request
from eeserve.worker.flops import CostModel
from eeserve.worker.forward import FullDepth, run_layer_loop
from eeserve.worker.inputs import BatchInputs, ForwardResult, prepare_inputs
from eeserve.worker.sampler import Sampler, SamplingMetadata


class ModelRunner:
    """Executes steps of the model over the paged cache.

    Args:
        model: the loaded backbone.
        kv_cache: the cache tensors.
        sampler: token sampler.
        exit_executor: the early-exit hooks of the layer loop, or None for full-depth execution.
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, sampler: Sampler,
                 exit_executor: ExitExecutor | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.exit_executor = exit_executor
        self.costs = CostModel(model.args)

    def full_forward(self, inputs: BatchInputs) -> ForwardResult:
        """All layers for every row; the shared head on the sample rows (the layer loop with no
        exit point)."""
        return run_layer_loop(self.model, self.kv_cache, inputs.token_ids, FullDepth(self.model, inputs, self.costs))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> ModelRunnerOutput:
        """Run one step.

        Args:
            out: the scheduler's decision.
            requests: id -> request for every scheduled id (read for sampling state).

        Returns:
            the sampled token (with its exit layer) of each request whose chunk samples.
        """
        inputs = prepare_inputs(out, self.kv_cache, self.model.device)
        if self.exit_executor is not None and self.exit_executor.needed(inputs, requests):
            result = self.exit_executor.forward(inputs, requests)
        else:
            result = self.full_forward(inputs)
        L = self.model.args.num_layers
        verify = self.exit_executor is not None and self.exit_executor.config.verify_exits
        sampled: dict[str, SampledToken] = {}
        if inputs.sample_request_ids:
            reqs = [requests[rid] for rid in inputs.sample_request_ids]
            sout = self.sampler(result.logits, _sampling_metadata(reqs, [r.num_output_tokens for r in reqs]))
            ids = sout.token_ids.tolist()
            for i, rid in enumerate(inputs.sample_request_ids):
                e = result.exit_layers[i]
                sampled[rid] = SampledToken(ids[i], e, sout.logprobs[i], draft=verify and e < L)
        return ModelRunnerOutput(sampled=sampled, stats=result.stats, request_flops=result.request_flops,
                                 verified=self._verify(result.verify_logits, requests))

    def _verify(self, verify_logits: dict[str, torch.Tensor], requests: dict[str, Request]) -> dict[str, tuple[SampledToken, ...]]:
        """The full-depth token of every draft position, each row sampled with the state (history,
        penalties, min_tokens, and the request's noise for that output index, ``Sampler``) that a
        full-depth step at that position would have had: the token a run without drafts makes
        there. The scheduler keeps a draft exactly when it equals it.

        Raises:
            RuntimeError: a request's pending rows and draft tokens differ in number (a bug: each
                draft leaves exactly one pending position).
        """
        if not verify_logits:
            return {}
        L = self.model.args.num_layers
        reqs, counts, owners = [], [], []
        for rid, logits in verify_logits.items():
            r = requests[rid]
            k = logits.shape[0]
            if k != r.num_draft_tokens:
                raise RuntimeError(f"request {rid!r}: {k} pending rows but {r.num_draft_tokens} draft tokens")
            first = r.num_output_tokens - k  # index of the first draft token
            reqs.extend([r] * k)
            counts.extend(range(first, first + k))
            owners.extend([rid] * k)
        sout = self.sampler(torch.cat(list(verify_logits.values())), _sampling_metadata(reqs, counts))
        out: dict[str, list[SampledToken]] = {}
        for rid, tid, lp in zip(owners, sout.token_ids.tolist(), sout.logprobs):
            out.setdefault(rid, []).append(SampledToken(tid, L, lp))
        return {rid: tuple(v) for rid, v in out.items()}


def _sampling_metadata(reqs: list[Request], num_outputs: list[int]) -> SamplingMetadata:
    """Sampler inputs for one row per entry: ``reqs[i]`` with its first ``num_outputs[i]`` output
    tokens as the history (penalties, min_tokens)."""
    return SamplingMetadata(
        params=[r.sampling_params for r in reqs],
        prompt_token_ids=[r.prompt_token_ids for r in reqs],
        output_token_ids=[r.output_token_ids if n == len(r.output_token_ids) else r.output_token_ids[:n]
                          for r, n in zip(reqs, num_outputs)],
        seeds=[r.seed for r in reqs],
        eos_token_ids=[r.eos_token_ids for r in reqs],
    )
