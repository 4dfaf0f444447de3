import numpy as np
import pytest
import torch

from conftest import random_bank
from latexblend.errors import LatexBlendError
from latexblend.generate import apply
from latexblend.rectify import RectifyOptions, concept_masks, match_clusters, modulate, resize_masks
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
    out = modulate(scores, spans, masks, tau=1.0, strength=2.0)
    # own:  S + 2*1*(1/2)*(max - S);  other: S - 2*1*(1/2)*(S - min)
    assert torch.equal(out[0], torch.tensor([[0.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))
    weak = modulate(scores, spans, masks, tau=0.5 ** 5, strength=2.0)
    assert weak[0, 0, 1].item() == pytest.approx(1 + 0.5 ** 5 * 2)
    assert torch.equal(modulate(scores, spans, masks, tau=0.0), scores)


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
