"""The dual-flow splice of Stage 1 (METHOD.md section 2, step 2): in every ``attn2`` layer, an instance sample
attends to the frozen base flow's K/V of its replace prompt, with the rows at the replace span overwritten by
the trainable concept flow's rows at the instance span. Gradients reach the trainable ``to_k``/``to_v`` only
through those rows (and through the prior samples, which keep the concept flow everywhere).

The splice is done once per step for all 70 layers, on the side-by-side K/V of every layer
(:meth:`~latexblend.train.model.ConceptFlow.project`, one matmul): the context rows are first put where
they land (the instance span's rows at the replace span's positions), so the spliced K/V of every layer is
one ``where`` between the concept flow's projection and the cached base flow. Which row goes where comes
from :class:`SpliceTables`, built once per run for every pair of templates; a step only picks its pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from latexblend.attention import KVProcessor
from latexblend.tokens import MAX_TOKENS, Span


@dataclass
class SpliceTables:
    """What the splice needs, fixed for a run (built by :func:`~latexblend.train.setup.build_setup`).

    ``layers``: the attn2 layers in order; ``sizes``: the widths of their ``k`` and ``v`` side by side (the
    layout of :meth:`~latexblend.train.model.ConceptFlow.project`). ``base``: the frozen base flow's K/V of
    every replace prompt, ``[templates, 77, sum of sizes]``, and their pooled embeddings (both ``None``
    without a base flow). For an instance prompt of template ``i`` spliced into the replace prompt of
    template ``j``, ``rows[i][j][r]`` is the context row whose concept-flow K/V output row ``r`` reads and
    ``take[i][j][r]`` whether that row is the concept flow's (the replace span) or the base flow's (every
    other row); a sample without base flow (prior samples; every sample with ``base_flow`` off) reads its
    own rows and takes the concept flow everywhere but BOS, whose K/V is the concept flow's, detached.
    """

    layers: list[str]
    sizes: list[int]
    base: torch.Tensor | None
    pooled: torch.Tensor | None = None  # [templates, P]: each replace prompt's pooled embedding
    rows: list[list[list[int]]] = field(default_factory=list)
    take: list[list[list[bool]]] = field(default_factory=list)

    @staticmethod
    def pairs(concept_spans: Sequence[Span], replace_spans: Sequence[Span]) -> tuple[list, list]:
        """``(rows, take)`` for every (instance template, replace template) pair (see the class doc)."""
        rows, take = [], []
        for cs in concept_spans:
            rows.append([]), take.append([])
            for rs in replace_spans:
                if cs.length != rs.length:
                    raise RuntimeError(f"concept span {cs} and replace span {rs} differ in length")
                r = list(range(MAX_TOKENS))
                r[rs.start : rs.stop] = range(cs.start, cs.stop)
                rows[-1].append(r)
                take[-1].append([rs.start <= i < rs.stop for i in range(MAX_TOKENS)])
        return rows, take

    @property
    def own_rows(self) -> list[int]:
        return list(range(MAX_TOKENS))

    @property
    def own_take(self) -> list[bool]:
        return [False] + [True] * (MAX_TOKENS - 1)


@dataclass
class SpliceState:
    """Where the splice puts each layer's K/V for the UNet call: ``modules`` are the attn2 modules by name,
    and :meth:`set` gives each one its ``(k, v)`` [B, 77, C] as the attribute ``spliced_kv`` (views of one
    tensor), which the one :class:`SpliceProcessor` of all layers reads. A tensor attribute of the module, not
    a per-layer processor, so that a compiled transformer block is one graph for every layer of its shape
    (regional compilation: :func:`~latexblend.train.setup.compile_unet`). ``record`` (tests, debugging): a
    dict that receives every layer's ``(k, v)``."""

    modules: dict = field(default_factory=dict)
    record: dict | None = None

    def set(self, tables: SpliceTables, projected: torch.Tensor, take: torch.Tensor, base_index: torch.Tensor | None,
            n_instance: int) -> None:
        """Splice ``projected`` [B, 77, F], the concept flow's K/V of every layer computed from the context
        with its rows already in place, into the base flow: ``take`` [B, 77, 1] selects the concept flow's
        rows; the others are the base flow of template ``base_index[i]`` for instance sample ``i`` (with a
        base flow) and the detached concept flow for the others (BOS). Then split per layer."""
        other = projected.detach()
        if tables.base is not None and n_instance:
            base = tables.base.index_select(0, base_index)
            other = base if n_instance == projected.shape[0] else torch.cat([base, other[n_instance:]])
        parts = torch.where(take, projected, other).split(tables.sizes, dim=-1)
        for i, layer in enumerate(tables.layers):
            self.modules[layer].spliced_kv = (parts[2 * i], parts[2 * i + 1])
            if self.record is not None:
                self.record[layer] = self.modules[layer].spliced_kv

    def clear(self) -> None:
        """Drop the step's K/V (kept until the backward: checkpointed blocks are recomputed there)."""
        for attn in self.modules.values():
            attn.spliced_kv = None


class SpliceProcessor(KVProcessor):
    """Dual-flow training, one instance for every attn2 layer: the layer attends to the K/V the step spliced
    for it (:meth:`SpliceState.set`)."""

    def __init__(self):
        super().__init__("attn2 (splice)")

    def kv(self, attn, context):
        return attn.spliced_kv
