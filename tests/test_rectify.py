import numpy as np
import pytest
import torch
from benchmarks.counters import OpCounter

from conftest import random_bank
from latexblend.blend.blender import apply
from latexblend.blend.guidance import layer_hw
from latexblend.blend.options import RectifyOptions
from latexblend.blend.rectify import coefficients, concept_masks, match_clusters, modulate, resize_masks
from latexblend.errors import LatexBlendError
from latexblend.tokens import Span, token_ids

NOUNS = ["dog", "cat", "car", "tree"]


def regions(h, w, count):
    """Ground-truth labels [h, w]: ``count`` vertical stripes (region 0 is the background)."""
    cols = torch.arange(w) * count // w
    return cols.expand(h, w).clone()


def constructed(h, w, concepts, seed=0):
    """A row-stochastic self-attention affinity with ``concepts + 1`` known blocks, and noun maps [C, N]
    peaking on region ``c + 1`` (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    truth = regions(h, w, concepts + 1).flatten()
    same = (truth[:, None] == truth[None, :]).float()
    affinity = same + 0.02 + 0.01 * torch.rand(h * w, h * w, generator=g)
    affinity = affinity / affinity.sum(1, keepdim=True)
    nouns = torch.stack([(truth == c + 1).float() * 0.3 for c in range(concepts)])
    nouns = nouns + 0.05 * torch.rand(nouns.shape, generator=g)
    return affinity, nouns, truth.view(h, w)


@pytest.mark.parametrize("concepts", [2, 3, 4])
@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_masks_are_the_known_disjoint_regions(concepts, hw):
    affinity, nouns, truth = constructed(*hw, concepts)
    masks = concept_masks(affinity, nouns, hw, clusters=concepts + 1, seed=0)
    assert masks.shape == (concepts, *hw) and masks.dtype == torch.bool
    for c in range(concepts):
        assert torch.equal(masks[c], truth == c + 1), c
    assert masks.sum(0).max() == 1  # disjoint


def test_masks_are_deterministic_for_one_seed():
    affinity, nouns, _ = constructed(8, 8, 3)
    noisy = affinity + 0.05 * torch.rand(affinity.shape, generator=torch.Generator().manual_seed(5))
    a = concept_masks(noisy, nouns, (8, 8), clusters=8, seed=3)
    b = concept_masks(noisy, nouns, (8, 8), clusters=8, seed=3)
    assert torch.equal(a, b)


def test_greedy_matching_is_one_to_one():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # both concepts like cluster 1 best; concept 0 likes it more, concept 1 falls back to cluster 2
    nouns = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.2], [0.0, 0.0, 0.9, 0.9, 0.5, 0.5]])
    assert match_clusters(labels, nouns) == [1, 2]
    with pytest.raises(LatexBlendError, match="raise rectify_clusters"):
        match_clusters(torch.zeros(6, dtype=torch.long), nouns)


def test_modulation_rule_by_hand():
    scores = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]]])  # [heads 1, N 2, K 4]
    spans = [Span("a", 1, 2), Span("b", 3, 1)]
    masks = torch.tensor([[True, False], [False, True]])  # a owns pixel 0, b pixel 1; |M|/N = 1/2
    own, other = coefficients(spans, masks, width=4, strength=2.0)
    out = modulate(scores, own, other, tau=1.0)
    # own:  S + 2*1*(1/2)*(max - S);  other: S - 2*1*(1/2)*(S - min)
    assert torch.equal(out[0], torch.tensor([[0.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))
    weak = modulate(scores, own, other, tau=0.5 ** 5)
    assert weak[0, 0, 1].item() == pytest.approx(1 + 0.5 ** 5 * 2)
    assert torch.equal(modulate(scores, own, other, tau=0.0), scores)


def test_batched_modulation_touches_only_the_conditional_span_columns():
    """One call for [uncond x2, cond x2] equals the rule applied sample by sample; the unconditional
    rows and the columns outside the spans come back bit-identical."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 3, 6, 10, generator=g)  # [B, heads, N, K]
    spans = [[Span("a", 2, 2), Span("b", 5, 1)], [Span("c", 1, 3)]]
    masks = [torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool),
             torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)]
    per = [coefficients(s, m, width=10) for s, m in zip(spans, masks, strict=True)]
    own = torch.cat([torch.zeros(2, 6, 10), torch.stack([p[0] for p in per])])[:, None]
    other = torch.cat([torch.zeros(2, 6, 10), torch.stack([p[1] for p in per])])[:, None]
    out = modulate(scores, own, other, tau=0.7)
    assert torch.equal(out[:2], scores[:2])
    for i in range(2):
        assert torch.allclose(out[2 + i], modulate(scores[2 + i], *per[i], tau=0.7))
    # sample 0: columns 0, 1, 4 and 6-9 are no concept's; sample 1 has a single concept (nothing to damp)
    for col in (0, 1, 4, 6, 7, 8, 9):
        assert torch.equal(out[2, ..., col], scores[2, ..., col])
    assert torch.equal(per[1][1], torch.zeros(6, 10))
    # a's own pixels (0, 1) are boosted in a's columns; b's pixels (3, 4) are damped there
    boosted, damped = out[2, :, :2, 2:4] - scores[2, :, :2, 2:4], out[2, :, 3:5, 2:4] - scores[2, :, 3:5, 2:4]
    assert (boosted >= 0).all() and (boosted > 0).any() and (damped <= 0).all() and (damped < 0).any()


def test_resize_masks_any_size_stays_disjoint():
    masks = torch.stack([regions(8, 12, 3) == 1, regions(8, 12, 3) == 2])
    for hw in [(4, 6), (2, 3), (16, 24), (5, 7)]:
        small = resize_masks(masks, hw)
        assert small.shape == (2, *hw) and small.sum(0).max() <= 1 and small[0].any() and small[1].any()


def test_options_validate():
    with pytest.raises(LatexBlendError, match="rectify_start"):
        RectifyOptions(start=1.2)
    with pytest.raises(LatexBlendError, match="rectify_clusters"):
        RectifyOptions(clusters=1)


def _banks(pipe, n):
    return [random_bank(pipe.unet, name=f"r{i}", noun=NOUNS[i], noun_ids=tuple(token_ids(pipe.tokenizer, NOUNS[i])),
                        seed=i) for i in range(n)]


def _run(pipe, banks, height, width, **kw):
    with apply(pipe, banks, rectify={"start": 0.6, "clusters": 4}, **kw) as b:
        g = torch.Generator().manual_seed(0)
        img = pipe(" and ".join(f"a {NOUNS[i]}" for i in range(len(banks))), num_inference_steps=3, generator=g,
                   height=height, width=width, output_type="np").images
        return img, b.steering.masks(0), b.steering.stats


@pytest.mark.parametrize("size, grid", [((64, 64), (4, 4)), ((64, 96), (4, 6)), ((96, 64), (6, 4))])
def test_rectification_on_the_tiny_model_any_size_and_reproducible(tiny_pipe, size, grid):
    banks = _banks(tiny_pipe, 3)
    img, masks, stats = _run(tiny_pipe, banks, *size)
    again, masks_again, _ = _run(tiny_pipe, banks, *size)
    assert stats["rectify_passes"] == 1
    assert masks.shape == (3, *grid) and masks.sum(0).max() == 1 and masks.flatten(1).any(1).all()
    assert np.isfinite(img).all() and img.shape[1:3] == size
    assert np.array_equal(img, again) and torch.equal(masks, masks_again)
    with apply(tiny_pipe, banks):
        g = torch.Generator().manual_seed(0)
        plain = tiny_pipe("a dog and a cat and a car", num_inference_steps=3, generator=g, height=size[0],
                          width=size[1], output_type="np").images
    assert not np.array_equal(img, plain)  # the modulation changed the image


def _last_main_call_ops(pipe, n):
    """Ops dispatched by the last main UNet call (CFG batch of 2; the capture pass has 1) of a
    3-step rectified generation with ``n`` concepts."""
    calls = []

    def enter(module, args, kwargs):
        if args[0].shape[0] == 2:
            calls.append(OpCounter())
            calls[-1].__enter__()

    def leave(module, args, output):
        if args[0].shape[0] == 2:
            calls[-1].__exit__(None, None, None)

    with apply(pipe, _banks(pipe, n), rectify={"start": 1.0, "clusters": 5}) as b:
        pre = pipe.unet.register_forward_pre_hook(enter, with_kwargs=True)
        post = pipe.unet.register_forward_hook(leave)
        try:
            g = torch.Generator().manual_seed(0)
            pipe(" and ".join(f"a {NOUNS[i]}" for i in range(n)), num_inference_steps=3, generator=g,
                 output_type="latent")
        finally:
            pre.remove()
            post.remove()
        assert b.steering.stats["rectify_passes"] == 1 and b.steering.masks(0).shape[0] == n
    assert len(calls) == 3
    return calls[-1].count


def test_rectified_step_costs_the_same_number_of_ops_for_any_concept_count(tiny_pipe):
    """The modulation is a fixed handful of tensor ops per layer (no loop over samples or concepts):
    the last UNet call of a rectified generation dispatches as many ops for 1, 2 or 4 concepts."""
    counts = [_last_main_call_ops(tiny_pipe, n) for n in (1, 2, 4)]
    assert counts[0] > 0 and counts == [counts[0]] * 3, counts


def _reference_edit(steering, scores):
    """METHOD section 6 written out sample by sample and concept by concept (the rule's plain reading)."""
    n = len(steering.state.row_spans)
    offset, tau = scores.shape[0] - n, steering.state.t_frac ** 5
    hw = layer_hw(scores.shape[2], steering.call.latent_hw)
    out = scores.clone()
    for i, spans in enumerate(steering.state.row_spans):
        if steering.masks(i) is None:
            continue
        masks = resize_masks(steering.masks(i), hw).flatten(1)
        s = scores[offset + i]
        smax, smin, union = s.amax(-1), s.amin(-1), masks.any(0)
        for span, own in zip(spans, masks, strict=True):
            other = union & ~own
            for col in range(span.start, span.stop):
                boost = 2.0 * tau * (1 - own.sum() / own.numel()) * (smax - s[..., col]) * own
                damp = 2.0 * tau * (1 - other.sum() / own.numel()) * (s[..., col] - smin) * other
                out[offset + i, ..., col] = s[..., col] + boost - damp
    return out


@pytest.mark.parametrize("cfg, prompts, size", [
    (6.0, ["<r0> and <r1>", "<r1> near <r0> and <r2>", "a tree"], (64, 64)),  # CFG; sample 2: no concept
    (1.0, ["<r2> and <r0>", "<r0>, <r1>"], (72, 56)),  # no CFG, odd layer grids (9x7, 5x4)
])
def test_batched_edit_equals_the_rule_per_sample_and_concept(tiny_pipe, cfg, prompts, size):
    compared = []
    with apply(tiny_pipe, [], optional=_banks(tiny_pipe, 3), rectify={"start": 1.0, "clusters": 4}) as b:
        steering, edit = b.steering, b.steering._edit

        def checked(layer, scores):
            out = edit(layer, scores)
            ref = _reference_edit(steering, scores)
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), layer
            offset = scores.shape[0] - len(prompts)
            assert torch.equal(out[:offset], scores[:offset])  # unconditional rows untouched
            compared.append(tuple(scores.shape))
            return out

        steering._edit = checked
        g = torch.Generator().manual_seed(0)
        tiny_pipe(prompts, num_inference_steps=2, generator=g, guidance_scale=cfg, height=size[0], width=size[1],
                  output_type="latent")
        no_concept = [i for i, p in enumerate(prompts) if steering.masks(i) is None]
    assert compared and {s[0] for s in compared} == {len(prompts) * (2 if cfg > 1 else 1)}
    assert len({s[2] for s in compared}) >= 2  # layers at more than one resolution
    assert no_concept == ([2] if cfg > 1 else [])


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal clusterings up to a renaming of the labels."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_top_eigenvectors_match_eigh_on_a_known_spectrum():
    from latexblend.blend.rectify import top_eigenvectors

    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64)).Q
    values = torch.cat([torch.tensor([1.0, 0.9, 0.8, 0.7, -0.95]), 0.3 * torch.rand(295, generator=g) - 0.15])
    m = (q * values.double()) @ q.T
    vecs = top_eigenvectors(m.float(), 4, seed=1)
    assert vecs.shape == (300, 4) and vecs.dtype == torch.float32
    expected = torch.linalg.eigh(m)[1][:, -4:]  # the -0.95 eigenvector is left out
    cos = (vecs.double() * expected).sum(0).abs()
    assert float(cos.min()) > 1 - 1e-6


@pytest.fixture(scope="module")
def captured_affinity(tiny_dir):
    """A self-attention affinity [1024, 1024] captured by the rectification pass at 512 px. Random attention
    is near uniform (no cluster structure to compare), so the attn1 query/key weights are sharpened x16 and
    the initial latent holds five regions: the affinity then has a few separated eigenvalues, then a bulk."""
    from latexblend.blend import steering
    from latexblend.models import load_pipeline

    pipe = load_pipeline(str(tiny_dir), device="cpu", dtype="fp32")
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight *= 16
                module.to_k.weight *= 16
    got = []
    real = steering.concept_masks

    def spy(affinity, *args):
        got.append(affinity.clone())
        return real(affinity, *args)

    h = 64
    g = torch.Generator().manual_seed(1)
    regions = torch.zeros(h, h, dtype=torch.long)
    regions[: h // 2, h // 2 :] = 1
    regions[h // 2 :, : h // 3] = 2
    regions[h // 2 :, h // 3 : 2 * h // 3] = 3
    regions[h // 4 : h // 2, : h // 4] = 4
    latents = (2 * torch.randn(5, 4, generator=g))[regions].permute(2, 0, 1)[None]
    latents = latents + 0.3 * torch.randn(1, 4, h, h, generator=g)
    steering.concept_masks = spy
    try:
        with apply(pipe, _banks(pipe, 3), rectify={"start": 0.6, "clusters": 8}):
            pipe("a dog and a cat and a car", num_inference_steps=3, latents=latents, height=512, width=512,
                 output_type="latent")
    finally:
        steering.concept_masks = real
    return got[0]


@pytest.mark.parametrize("clusters", [4, 8])
def test_top_k_solver_gives_the_exact_solvers_clusters_on_a_captured_affinity(captured_affinity, clusters):
    from latexblend.blend.rectify import cluster_pixels

    assert captured_affinity.shape == (1024, 1024)
    exact = cluster_pixels(captured_affinity, clusters, seed=0, exact=True)
    fast = cluster_pixels(captured_affinity, clusters, seed=0, exact=False)
    assert len(exact.unique()) == clusters and _same_partition(exact, fast)
