"""Self-attention rectification (METHOD section 6): cluster pixels by self-attention affinity at one
early step, give each concept one cluster, and from then on steer each concept's cross-attention
logits toward its own region and away from the other concepts' regions.

Clustering is spectral (Ng-Jordan-Weiss: top eigenvectors of the normalised affinity, rows normalised;
above 1024 pixels by seeded subspace iteration instead of a full eigendecomposition) followed by
seeded k-means++ / Lloyd in torch, on the affinity's device; masks come from the hard
assignment, so they are disjoint for any number of concepts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from latexblend.errors import LatexBlendError
from latexblend.tokens import Span

STRENGTH = 2.0  # c in the modulation rule


#: Up to this many pixels (1024: SDXL at 512 px) the eigenvectors come from a full float64 eigendecomposition;
#: above it (4096 at 1024 px) from :func:`top_eigenvectors`.
EXACT_MAX = 1024


def top_eigenvectors(m: torch.Tensor, k: int, seed: int = 0, iters: int = 80, extra: int = 24) -> torch.Tensor:
    """The eigenvectors of the ``k`` largest eigenvalues of a symmetric ``m`` [N, N] (a normalised affinity,
    spectrum in ``[-1, 1]``), by seeded randomised subspace iteration in ``m``'s dtype: ``iters`` products
    of ``m`` with an ``N x (k + extra)`` block, re-orthonormalised each time, then the Rayleigh-Ritz step
    (a small eigendecomposition in float64) keeps the ``k`` algebraically largest. The oversampled block
    converges at the rate ``|lambda_(k+extra+1) / lambda_k|`` per product, fast where the spectrum has a
    gap after the clusters; it holds the top ``k`` as long as fewer than ``extra`` negative eigenvalues
    outweigh ``lambda_k``. ``O(iters N^2 (k + extra))`` instead of ``O(N^3)``, and no device sync.
    Columns in ascending eigenvalue order, as ``torch.linalg.eigh``'s."""
    n = m.shape[0]
    width = min(n, k + extra)
    g = torch.Generator(device=m.device).manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, width, generator=g, device=m.device, dtype=m.dtype)).Q
    for _ in range(iters):
        q = torch.linalg.qr(m @ q).Q
    small = (q.T @ m @ q).double()
    _, vecs = torch.linalg.eigh((small + small.T) / 2)
    return q @ vecs[:, -k:].to(q.dtype)


def spectral_embedding(affinity: torch.Tensor, k: int, exact: bool | None = None, seed: int = 0) -> torch.Tensor:
    """Rows of the top-``k`` eigenvectors of ``D^-1/2 W D^-1/2`` (``W`` = symmetrised affinity), each row
    normalised: ``[N, N]`` -> ``[N, k]``. Eigenvector signs are fixed (largest entry positive).

    ``exact`` (default: ``N <=`` :data:`EXACT_MAX`): a full eigendecomposition in float64 (float32 on
    MPS); else :func:`top_eigenvectors` in float32, seeded with ``seed``."""
    exact = affinity.shape[0] <= EXACT_MAX if exact is None else exact
    dtype = torch.float64 if exact and affinity.device.type != "mps" else torch.float32
    w = affinity.to(dtype)
    w = (w + w.T) / 2
    d = w.sum(1).clamp_min(1e-12).rsqrt()
    m = d[:, None] * w * d[None, :]
    emb = torch.linalg.eigh(m)[1][:, -k:] if exact else top_eigenvectors(m, k, seed)
    sign = torch.sign(emb.gather(0, emb.abs().argmax(0, keepdim=True)))
    emb = emb * torch.where(sign == 0, torch.ones_like(sign), sign)
    return F.normalize(emb, dim=1)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """Seeded k-means++ initialisation then Lloyd iterations: points ``[N, D]`` -> labels ``[N]``."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    centers = x[torch.randint(x.shape[0], (1,), generator=g, device=x.device)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centers).amin(1).square()
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=g) if d2.sum() > 0 else d2.argmax().view(1)
        centers = torch.cat([centers, x[pick]])
    labels = torch.cdist(x, centers).argmin(1)
    for _ in range(iters):
        onehot = F.one_hot(labels, k).to(x.dtype)  # [N, k]: all centres in one matmul, no sync per cluster
        counts = onehot.sum(0)[:, None]
        centers = torch.where(counts > 0, onehot.T @ x / counts.clamp_min(1), centers)  # empty: keep
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def cluster_pixels(affinity: torch.Tensor, clusters: int, seed: int = 0, exact: bool | None = None) -> torch.Tensor:
    """Spectral clustering of ``N`` pixels from their affinity ``[N, N]`` -> labels ``[N]`` (``exact``: see
    :func:`spectral_embedding`)."""
    k = min(clusters, affinity.shape[0])
    return kmeans(spectral_embedding(affinity, k, exact, seed), k, seed)


def match_clusters(labels: torch.Tensor, noun_maps: torch.Tensor) -> list[int]:
    """Greedy one-to-one concept -> cluster: ``noun_maps`` [C, N] are min-max normalised per concept and
    averaged inside each cluster; the best (concept, cluster) pair is taken first, then the next."""
    lo, hi = noun_maps.amin(1, keepdim=True), noun_maps.amax(1, keepdim=True)
    norm = (noun_maps - lo) / (hi - lo).clamp_min(1e-12)
    ids = labels.unique().tolist()
    if len(ids) < noun_maps.shape[0]:
        raise LatexBlendError(f"rectification found {len(ids)} pixel clusters for {noun_maps.shape[0]} concepts; "
                              "raise rectify_clusters")
    score = torch.stack([norm[:, labels == j].mean(1) for j in ids], dim=1).double()  # [C, clusters]
    chosen = [-1] * noun_maps.shape[0]
    for _ in chosen:
        c, j = divmod(int(score.argmax()), score.shape[1])
        chosen[c] = ids[j]
        score[c, :] = -torch.inf
        score[:, j] = -torch.inf
    return chosen


def concept_masks(affinity: torch.Tensor, noun_maps: torch.Tensor, hw: tuple[int, int], clusters: int = 8,
                  seed: int = 0) -> torch.Tensor:
    """Each concept's region from self-attention ``affinity`` [N, N] and noun maps [C, N] on an
    ``hw`` grid (``h * w = N``) -> disjoint boolean masks ``[C, h, w]``."""
    labels = cluster_pixels(affinity, clusters, seed)
    chosen = match_clusters(labels, noun_maps.to(affinity.device))
    return torch.stack([labels == j for j in chosen]).view(-1, *hw)


def resize_masks(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Boolean masks ``[C, h, w]`` -> ``[C, h', w']`` by area averaging and a 0.5 threshold (stays disjoint)."""
    if tuple(masks.shape[-2:]) == tuple(hw):
        return masks
    return F.interpolate(masks[None].float(), size=hw, mode="area")[0] > 0.5


def coefficients(spans: Sequence[Span], masks: torch.Tensor, width: int,
                 strength: float = STRENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """The modulation of one sample as two ``[N, width]`` coefficient maps (``masks`` [C, N], one per
    span, at one layer's resolution; ``width`` = the number of key columns): on the span's columns,
    ``own = c (1 - |M_own|/N) M_own`` and ``other = c (1 - |M_oth|/N) M_oth`` (``M_oth`` = the other
    concepts' pixels); zero on every other column. See :func:`modulate`."""
    n = masks.shape[1]
    masks = masks.float()
    union = masks.amax(0)
    own = masks.new_zeros(n, width)
    other = masks.new_zeros(n, width)
    for span, mine in zip(spans, masks, strict=True):
        rest = union - mine
        own[:, span.start : span.stop] = (strength * (1 - mine.sum() / n) * mine)[:, None]
        other[:, span.start : span.stop] = (strength * (1 - rest.sum() / n) * rest)[:, None]
    return own, other


def modulate(scores: torch.Tensor, own: torch.Tensor, other: torch.Tensor, tau: float) -> torch.Tensor:
    """DenseDiffusion-style logit modulation (METHOD section 6) of pre-softmax ``scores`` [..., N, K]
    with coefficient maps ``own``/``other`` broadcastable to them (:func:`coefficients`, stacked over
    samples; zero rows leave a sample untouched):
    ``S += tau own (max_k S - S)`` (boost inside the concept's region) and
    ``S -= tau other (S - min_k S)`` (suppress inside the other concepts' regions).
    A fixed number of tensor operations per layer, whatever the batch size or concept count. Scores
    must be finite (an ``-inf`` would turn into NaN even where the coefficients are zero)."""
    smax, smin = scores.amax(-1, keepdim=True), scores.amin(-1, keepdim=True)
    return scores + tau * (own * (smax - scores) - other * (scores - smin))
