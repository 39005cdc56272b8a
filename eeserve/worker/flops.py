"""FLOP costs (docs/design.md section 4, no attention) and the meter that counts them.

``CostModel`` is the one place the cost of each piece of work is written down: a decoder layer,
the LM head, a confidence check, an exit head, a ``propagate`` fill. ``FlopMeter`` is the one
place a step's costs are counted: the layer loop (full depth or with early exit) reports what it
ran to it, and it hands back ``StepStats`` and the per-request (spent, full depth) pairs.
Calibration's models of a setting's cost (``tuning.cost_model``, ``early_exit.drafts``) are
built from the same ``CostModel``.
"""

from __future__ import annotations

from eeserve.core.interfaces import StepStats


class CostModel:
    """FLOPs per token of each piece of work, for one model.

    Args:
        args: the model's ``ModelArgs`` (hidden size, layers, vocabulary, K/V width).
    """

    def __init__(self, args) -> None:
        self.args = args
        self.num_layers = args.num_layers
        self.hidden_size = args.hidden_size
        self.layer = args.layer_flops()  # one decoder layer
        self.head = args.head_flops()  # the LM head over the full vocabulary
        self.full_depth = args.full_depth_flops()  # all layers and the LM head

    def layers(self, n: int) -> float:
        """``n`` decoder layers."""
        return n * self.layer

    def exit_head(self, head) -> float:
        """An exit head's full-vocabulary logits: its transform and the LM head matrix."""
        return self.head + head.transform_flops(self.hidden_size)

    def logit_check(self, head, pruned_k: int | None) -> float:
        """A ``softmax`` / ``margin`` / ``entropy`` check: the exit head over the full vocabulary,
        or (``pruned_k``) over K ids only."""
        if pruned_k:
            return 2.0 * self.hidden_size * pruned_k + head.transform_flops(self.hidden_size)
        return self.exit_head(head)

    def saturation_check(self) -> float:
        """A ``saturation`` check: the cosine of two [H] vectors."""
        return 6.0 * self.hidden_size

    def classifier_check(self, head) -> float:
        """A ``classifier`` check (with its candidate logits when the head has them)."""
        return head.classifier_flops(self.hidden_size)

    def propagate_fill(self, exit_layer: int) -> float:
        """K/V of the layers ``exit_layer..L-1`` from one exit hidden state (one stacked product)."""
        return 2.0 * (self.num_layers - exit_layer) * 2 * self.args.kv_dim * self.hidden_size


class FlopMeter:
    """Counts the FLOPs of one step.

    Every row belongs to a request; decode rows' requests get their own account, closed once per
    step when the decode row leaves (at an exit point or at L).

    Args:
        costs: the model's ``CostModel``.
    """

    def __init__(self, costs: CostModel) -> None:
        self.costs = costs
        self.stats = StepStats()
        self.request_flops: dict[str, tuple[float, float]] = {}  # request id -> (spent, full depth)
        self._spent: dict[str, float] = {}

    def layers(self, rows: list[tuple[str, int]], num_layers: int) -> None:
        """``num_layers`` layers ran for ``rows``: (request id, number of its rows) pairs."""
        per_row = self.costs.layers(num_layers)
        total = 0
        for rid, n in rows:
            self._spent[rid] = self._spent.get(rid, 0.0) + n * per_row
            total += n
        self.stats.layer_flops += total * per_row

    def head(self, request_ids: list[str], flops: float) -> None:
        """A head or a confidence check of ``flops`` per row ran once for each of ``request_ids``."""
        self.stats.head_flops += flops * len(request_ids)
        for rid in request_ids:
            self._spent[rid] = self._spent.get(rid, 0.0) + flops

    def fill(self, request_ids: list[str], flops: float) -> None:
        """A K/V fill of ``flops`` per row ran once for each of ``request_ids``."""
        self.stats.kv_fill_flops += flops * len(request_ids)
        for rid in request_ids:
            self._spent[rid] = self._spent.get(rid, 0.0) + flops

    def close(self, request_id: str, exit_layer: int) -> None:
        """The request's decode row left after ``exit_layer`` layers: close its account."""
        full = self.costs.full_depth
        spent = self._spent.get(request_id, 0.0)
        self.stats.decode_full_flops += full
        self.stats.decode_flops += spent
        self.stats.exits[exit_layer] = self.stats.exits.get(exit_layer, 0) + 1
        self.request_flops[request_id] = (spent, full)

    def full_depth_step(self, num_rows: int, num_sample_rows: int, decode_request_ids: tuple[str, ...]) -> None:
        """A whole step at full depth: ``num_rows`` rows through every layer, the LM head on the
        sample rows; each decode row costs exactly the full-depth cost."""
        c = self.costs
        self.stats.layer_flops += num_rows * c.layers(c.num_layers)
        self.stats.head_flops += num_sample_rows * c.head
        n = len(decode_request_ids)
        self.stats.decode_full_flops += n * c.full_depth
        self.stats.decode_flops += n * c.full_depth
        if n:
            self.stats.exits[c.num_layers] = n
        for rid in decode_request_ids:
            self.request_flops[rid] = (c.full_depth, c.full_depth)
