"""How much of an object's colour the toy model reads from the EOS and padding rows of the prompt.

    python scripts/toy_padding_probe.py

For 10 coloured one-object prompts x 4 seeds it generates with the prompt's text features as they are,
then with rows swapped between the prompt and the same prompt without its colour words, aligned at each
prompt's EOS token: the EOS and padding rows from the colourless prompt, only the padding rows from it,
and the reverse (the words colourless, only the padding coloured). The pooled embedding stays the
coloured prompt's. Prints the share of images whose object has the asked-for colour. A blended
concept replaces only its own rows, so a model that reads colour from the padding keeps drawing the
prompt's plain object (docs/TOY.md).
"""

from __future__ import annotations

import re

import torch
from train_toy import splice  # scripts/ is on the path when this script runs

from latexblend import toy
from latexblend.models import load_pipeline

PROMPTS = ["a red dog on the grass", "a blue car in the snow", "a yellow tree at night", "a purple dog on the beach",
           "a red and yellow car at night", "a blue and purple tree on the grass",
           "a yellow and purple dog in the snow", "a red and blue car on the beach",
           "a blue and purple car on the beach", "a red and yellow dog in the snow"]
COLOUR = re.compile(r"^a ((red|blue|yellow|purple)( and (red|blue|yellow|purple))? )")


def main() -> None:
    pipe = load_pipeline("toy", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    rows = {"as prompted": [], "EOS + padding from the colourless prompt": [],
            "padding from the colourless prompt": [], "only the padding coloured": []}
    for prompt in PROMPTS:
        cls, colour = toy.parse_prompt(prompt)["objects"][0]
        plain = COLOUR.sub("a ", prompt)
        eos, eos0 = (len(pipe.tokenizer(p).input_ids) - 1 for p in (prompt, plain))  # EOS positions
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=4)
        emb0 = pipe.encode_prompt(plain, device="cpu", num_images_per_prompt=4)[0]
        swaps = {"as prompted": emb,
                 "EOS + padding from the colourless prompt": splice(emb, eos, emb0, eos0),
                 "padding from the colourless prompt": splice(emb, eos + 1, emb0, eos0 + 1),
                 "only the padding coloured": splice(emb0, eos0 + 1, emb, eos + 1)}
        for name, context in swaps.items():
            gens = [torch.Generator().manual_seed(j) for j in range(4)]
            images = pipe(prompt_embeds=context, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                          negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=20, guidance_scale=5.0,
                          height=toy.SIZE, width=toy.SIZE, generator=gens).images
            rows[name] += [toy.detect(im).has(cls, colour) for im in images]
    for name, hits in rows.items():
        print(f"{name}: colour right {100 * sum(hits) / len(hits):.0f}% of {len(hits)}")


if __name__ == "__main__":
    main()
