"""Blending guidance (METHOD section 5): cross-attention maps, their symmetric-KL distance, g1 + g2,
and one latent update ``z <- z - step_size * grad_z (g1 + g2)``.

A *map* here is a head-averaged cross-attention probability map ``[B, N, 77]`` recorded by
:class:`~latexblend.blend.processor.BlendProcessor`; several layers are combined into ``[B, 77, h, w]`` at the
finest recorded resolution (bilinear resize, mean over layers). Each token's map becomes a spatial
distribution ``softmax(pool(A) / tau)`` (4x4 average pooling, tau = 0.01).

Which map represents what (our definition; the paper leaves it implicit):
- g1 (binding), per concept: ``sum_j D(A[slot], A[noun_j])`` over the concept's noun tokens;
- g2 (separation): ``-sum_{a < b} D(A[a], A[b])`` over unordered pairs of concepts of one sample,
  where a concept is represented by its **last noun token** (the token bind copies onto the slot).
Losses are per sample (``[B]``); the batch loss is their sum, so each sample's gradient is its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from latexblend.blend.options import BLOCKS
from latexblend.blend.processor import BlendState
from latexblend.device import gradient_checkpointing
from latexblend.errors import LatexBlendError
from latexblend.tokens import Span

TAU = 0.01
POOL = 4


def select_layers(shapes: Mapping[str, int], spec: str) -> list[str]:
    """attn2 layer names chosen by ``spec``: ``all``, or comma-separated items, each ``down`` / ``mid`` /
    ``up``, an inner dim (``640``, ``1280``: one resolution on SDXL) or a module-name prefix
    (``up_blocks.0``). ``shapes``: inner dim per attn2 layer, in module order."""
    items = [s.strip() for s in spec.split(",")]
    if spec.strip() == "all":
        return list(shapes)
    chosen: set[str] = set()
    for item in items:
        if item.isdigit():
            hit = {n for n, c in shapes.items() if c == int(item)}
        else:
            prefix = BLOCKS.get(item, item)
            hit = {n for n in shapes if item and (n == prefix or n.startswith(prefix.rstrip(".") + "."))}
        if not hit:
            dims = ", ".join(str(d) for d in sorted(set(shapes.values())))
            raise LatexBlendError(f"guidance layer set '{item}' matches no attn2 layer; use all, down, mid, up, "
                                  f"an inner dim ({dims}) or a block prefix such as up_blocks.0")
        chosen |= hit
    return [n for n in shapes if n in chosen]


# --------------------------------------------------------------------------- maps


def layer_hw(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Grid ``(h, w)`` of a layer with ``tokens`` pixels in a UNet whose input latent is ``latent_hw``
    (every level halves each side, rounding up like a stride-2 convolution with padding 1)."""
    h, w = latent_hw
    while h * w > tokens and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise RuntimeError(f"a layer with {tokens} pixels does not fit a {latent_hw[0]}x{latent_hw[1]} latent")
    return h, w


def token_maps(maps: Mapping[str, torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Per-layer maps ``{layer: [B, N_l, K]}`` -> their mean ``[B, K, h, w]`` at the finest resolution."""
    grids = []
    for m in maps.values():
        hl, wl = layer_hw(m.shape[1], latent_hw)
        grids.append(m.transpose(1, 2).reshape(m.shape[0], m.shape[2], hl, wl))
    h, w = max((g.shape[-2:] for g in grids), key=lambda s: s[0] * s[1])
    grids = [g if g.shape[-2:] == (h, w) else F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)
             for g in grids]
    return torch.stack(grids).mean(0)


def pool_kernel(h: int, w: int, pool: int = POOL) -> int:
    """``pool``, reduced so that the pooled map keeps at least 4 pixels a side (64x64 -> 16x16 on
    1024 px SDXL as in the release; the 4x4 maps of the 64 px tiny model stay unpooled)."""
    return max(1, min(pool, min(h, w) // 4))


def spatial_log_probs(maps: torch.Tensor, tau: float = TAU, pool: int = POOL) -> torch.Tensor:
    """``log softmax(avgpool(A) / tau)`` over pixels: ``[..., h, w]`` -> ``[..., P]``."""
    *lead, h, w = maps.shape
    k = pool_kernel(h, w, pool)
    pooled = F.avg_pool2d(maps.reshape(-1, 1, h, w).float(), k, ceil_mode=True)
    return (pooled.reshape(*lead, -1) / tau).log_softmax(dim=-1)


def sym_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p||q) + KL(q||p) = sum (p - q)(log p - log q)`` over the last dim: ``[..., P]`` -> ``[...]``."""
    return ((logp.exp() - logq.exp()) * (logp - logq)).sum(dim=-1)


def distance(a: torch.Tensor, b: torch.Tensor, tau: float = TAU, pool: int = POOL) -> torch.Tensor:
    """Symmetric KL between the spatial distributions of maps ``a``, ``b`` [..., h, w] -> [...]."""
    return sym_kl(spatial_log_probs(a, tau, pool), spatial_log_probs(b, tau, pool))


def g1(logp: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
    """Binding term of one sample: ``logp`` [K, P] (token distributions); every concept contributes."""
    terms = [sym_kl(logp[s.start], logp[j]) for s in spans for j in range(s.start + 1, s.stop)]
    return torch.stack(terms).sum() if terms else logp.new_zeros(())


def g2(logp: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
    """Separation term of one sample: minus the sum over unordered concept pairs of the distance
    between their last noun tokens' distributions (``logp`` [K, P])."""
    terms = [sym_kl(logp[a.stop - 1], logp[b.stop - 1]) for i, a in enumerate(spans) for b in spans[i + 1:]]
    return -torch.stack(terms).sum() if terms else logp.new_zeros(())


def guidance_loss(maps: torch.Tensor, row_spans: Sequence[Sequence[Span]], tau: float = TAU,
                  pool: int = POOL) -> torch.Tensor:
    """``g1 + g2`` per sample: ``maps`` [B, K, h, w], ``row_spans[i]`` the spans of sample i -> [B]."""
    logp = spatial_log_probs(maps, tau, pool)  # [B, K, P]
    return torch.stack([g1(logp[i], spans) + g2(logp[i], spans) for i, spans in enumerate(row_spans)])


# --------------------------------------------------------------------------- the guidance pass


@contextlib.contextmanager
def recording(state: BlendState, layers, sink=None, edit=None, plain: bool = False) -> Iterator[BlendState]:
    """Within the block, the processors send the maps of ``layers`` to ``sink``, edit logits with ``edit`` and
    (``plain``) use the prompt's own K/V; the previous settings come back afterwards."""
    old = (state.record, state.sink, state.edit, state.plain)
    state.record, state.sink, state.edit, state.plain = frozenset(layers), sink, edit, plain
    try:
        yield state
    finally:
        state.record, state.sink, state.edit, state.plain = old


@contextlib.contextmanager
def frozen_unet(unet, checkpointing: bool = False) -> Iterator[None]:
    """UNet weights never require grad inside (restored after); optional gradient checkpointing."""
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.requires_grad_(False)
    was_ckpt = bool(getattr(unet, "is_gradient_checkpointing", False))
    if checkpointing and not was_ckpt:
        gradient_checkpointing(unet, True)
    try:
        yield
    finally:
        if checkpointing and not was_ckpt:
            gradient_checkpointing(unet, False)
        for p, flag in flags:
            p.requires_grad_(flag)


def collector(store: dict) -> Callable[[str, torch.Tensor], None]:
    """A map sink keeping each layer's first map in ``store``: a checkpointed block recomputed during
    backward reports again, and its second report is not the one the loss was built from."""

    def sink(layer: str, probs: torch.Tensor) -> None:
        store.setdefault(layer, probs)

    return sink


def guidance_pass(unet, z: torch.Tensor, scale: torch.Tensor, call, state: BlendState, layers: Sequence[str],
                  row_spans: Sequence[Sequence[Span]], latent_hw: tuple[int, int],
                  checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and its gradient with respect to the scheduler-space latent ``z`` [B, 4, h, w] (conditional
    samples only). ``call(x)`` runs the UNet on the conditional branch at ``x = scale * z`` (``scale`` = the
    scheduler's ``scale_model_input`` factor) while the maps of ``layers`` are recorded; its output is not
    used, and autograd goes back only through the recorded layers. Returns ``(grad [B, 4, h, w], loss [B])``."""
    recorded: dict[str, torch.Tensor] = {}
    z = z.detach().float().requires_grad_(True)
    with torch.enable_grad(), frozen_unet(unet, checkpointing), recording(state, layers, collector(recorded),
                                                                          edit=state.edit):
        call((scale * z).to(unet.dtype))
        loss = guidance_loss(token_maps(recorded, latent_hw), row_spans)
        grad = torch.autograd.grad(loss.sum(), z)[0] if loss.requires_grad else torch.zeros_like(z)
    return grad.detach(), loss.detach()
