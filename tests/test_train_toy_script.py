"""scripts/train_toy.py's padding swap (the toy model's last 4,000 training steps; docs/TOY.md)."""

from __future__ import annotations

import random

import torch

from conftest import load_script


def test_swap_padding_moves_only_eos_and_padding_rows_aligned_at_the_eos():
    script = load_script("train_toy")
    emb = torch.arange(3 * 77, dtype=torch.float32).reshape(3, 77, 1)  # caption i, row r -> 77 i + r
    data = {"emb": emb, "lengths": torch.tensor([5, 9, 3])}  # EOS rows at 4, 8 and 2
    rng = random.Random(0)
    out = script.swap_padding(emb[[0, 1]].clone(), [0, 1], data, rng, share=1.0)
    for i, c in enumerate([0, 1]):
        eos = int(data["lengths"][c]) - 1
        assert torch.equal(out[i, :eos], emb[c, :eos])  # the words' rows are kept
        donor = int(out[i, eos, 0]) // 77
        start = int(data["lengths"][donor]) - 1
        expected = torch.clamp(torch.arange(start, start + 77 - eos), max=76)
        assert torch.equal(out[i, eos:, 0], emb[donor, expected, 0])  # the donor's EOS onwards, aligned
    same = script.swap_padding(emb[[0, 1]].clone(), [0, 1], data, random.Random(5), share=0.0)
    assert torch.equal(same, emb[[0, 1]])  # share 0: nothing swapped
