"""The dual-flow splice of Stage 1 (METHOD.md section 2, step 2): in every ``attn2`` layer, an instance sample
attends to the frozen base flow's K/V of its replace prompt, with the rows at the replace span overwritten by
the trainable concept flow's rows at the instance span. Gradients reach the trainable ``to_k``/``to_v`` only
through those rows (and through the prior samples, which keep the concept flow everywhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from latexblend.attention import KVProcessor, project_kv
from latexblend.tokens import Span


@dataclass
class SpliceState:
    """What the splice processors share during one training step.

    The UNet batch is ``[instance..., prior...]``. For instance sample ``i`` (when ``base_kv`` is
    given) ``base_kv[i][layer]`` holds the frozen base flow's ``(k, v)`` [77, C] of its replace prompt;
    ``concept_spans[i]`` is the span ``[<new1>, noun...]`` in the instance prompt and
    ``replace_spans[i]`` the span ``[a, noun...]`` in the replace prompt (equal lengths), both set with
    :meth:`set_spans`. ``record`` (tests, debugging): a dict that receives every layer's final ``(k, v)``.
    """

    base_kv: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    concept_spans: list[Span] = field(default_factory=list)
    replace_spans: list[Span] = field(default_factory=list)
    record: dict | None = None
    rows: torch.Tensor | None = None  # [n, 77]: see set_spans

    def set_spans(self, concept_spans: Sequence[Span], replace_spans: Sequence[Span], device=None) -> None:
        """Set the spans and build ``rows`` [n, 77]: row ``j`` of instance sample ``i`` is row ``rows[i, j]``
        of ``cat([base (77 rows), concept (77 rows)])``. Positions live in a tensor, built before the UNet
        runs, so a compiled UNet does not specialise (and recompile) on each pair of templates."""
        rows = torch.arange(77).repeat(len(concept_spans), 1)
        for i, (cs, rs) in enumerate(zip(concept_spans, replace_spans, strict=True)):
            if cs.length != rs.length:
                raise RuntimeError(f"concept span {cs} and replace span {rs} differ in length")
            rows[i, rs.start : rs.stop] = torch.arange(77 + cs.start, 77 + cs.stop)
        self.concept_spans, self.replace_spans, self.rows = list(concept_spans), list(replace_spans), rows.to(device)

    def spliced(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concept-flow ``k``, ``v`` [B, 77, C] -> what the UNet attends to: for each instance sample the
        base-flow rows with the replace span overwritten by the concept flow's span rows; the other
        samples keep the concept flow. Row 0 (BOS) never carries gradient."""
        ks, vs = [], []
        for i in range(k.shape[0]):
            ki, vi = k[i], v[i]
            if i < len(self.base_kv):
                bk, bv = (t.to(ki.dtype) for t in self.base_kv[i][layer])
                ki = torch.cat([bk, ki]).index_select(0, self.rows[i])
                vi = torch.cat([bv, vi]).index_select(0, self.rows[i])
            ks.append(torch.cat([ki[:1].detach(), ki[1:]]))
            vs.append(torch.cat([vi[:1].detach(), vi[1:]]))
        out = torch.stack(ks), torch.stack(vs)
        if self.record is not None:
            self.record[layer] = out
        return out


class SpliceProcessor(KVProcessor):
    """Dual-flow training: trainable ``to_k``/``to_v`` (the concept flow) on the whole batch, spliced
    into the cached base flow at the span for instance samples (:meth:`SpliceState.spliced`)."""

    def __init__(self, layer: str, state: SpliceState):
        super().__init__(layer)
        self.state = state

    def kv(self, attn, context):
        k, v = project_kv(attn, context)
        return self.state.spliced(self.layer, k, v)
