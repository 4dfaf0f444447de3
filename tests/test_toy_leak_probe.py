"""scripts/toy_leak_probe.py's key mix: K rows moved from the bank's toward the prompt's own at the span."""

from __future__ import annotations

import pytest
import torch

from conftest import load_script, random_bank


@pytest.mark.parametrize("prompt, span", [("a dog on the beach", (1, 3)),  # BOS a dog ...
                                          ("a blue tree next to a dog at night", (6, 8))])  # ... next to a dog
@torch.no_grad()
def test_key_mix_interpolates_between_the_bank_and_the_prompts_own_rows(tiny_pipe, prompt, span):
    from latexblend.models import attn2_modules

    script = load_script("toy_leak_probe")
    bank = random_bank(tiny_pipe.unet)
    context = tiny_pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]
    full, none, half = (script.key_mixed(tiny_pipe, bank, prompt, m) for m in (1.0, 0.0, 0.5))
    for layer, attn in attn2_modules(tiny_pipe.unet).items():
        own = attn.to_k(context)[0, span[0] : span[1]]
        torch.testing.assert_close(full.k[layer], bank.k[layer])
        torch.testing.assert_close(none.k[layer], own)
        torch.testing.assert_close(half.k[layer], (own + bank.k[layer]) / 2)
        assert not torch.allclose(none.k[layer], bank.k[layer])
        assert half.v[layer] is bank.v[layer]  # values stay the bank's
