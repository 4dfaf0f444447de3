"""A regression test of the method on the trained toy model: a concept trained with the toy recipe
carries what it learned (its colours) into new scenes only through its bank.

What is asserted is what training seed 0 gives (docs/TOY.md): the bank moves the slot object's colour
to the concept's colours (75% of these 16 images vs 38% without a bank). The effect depends on the
seed (`bench fidelity --seed S`: 84/44%, 31/38%, 44/34%, 28/22% with/without the bank for
S = 0, 1, 2, 42) and the concept's two-tone arrangement is not learned at all: this catches a break
in train / extract / blend on a trained model, it does not show the method works on the toy.
"""

from __future__ import annotations

from latexblend.fidelity import FidelitySettings, generate_rows, summarise, train_variant
from latexblend.toy import draw_data

PROMPTS = ["a car on the beach", "a car in the snow", "a car at night", "a car on the grass"]


def test_trained_concept_colours_reach_new_scenes_only_with_its_bank_at_seed_0(tmp_path, monkeypatch):
    from latexblend.models import load_pipeline

    monkeypatch.setenv("LATEXBLEND_HOME", str(tmp_path / "home"))
    settings = FidelitySettings(concepts=["stripecar"], seeds=4, quality=False, seed=0)
    data = draw_data(tmp_path, "stripecar", settings.num_images, settings.num_prior, settings.seed)
    bank = train_variant(tmp_path, "stripecar", "full", settings, data)
    pipe = load_pipeline("toy", device="cpu", dtype="fp32")
    with_bank = summarise(generate_rows(pipe, PROMPTS, settings.seeds, settings, ["stripecar"], [bank])[0])
    without = summarise(generate_rows(pipe, PROMPTS, settings.seeds, settings, ["stripecar"], None)[0])
    print(f"slot colour: {with_bank['slot_colour_pct']:.0f}% with the bank, {without['slot_colour_pct']:.0f}% without")
    assert with_bank["slot_colour_pct"] >= 65, with_bank
    assert without["slot_colour_pct"] <= 55, without
    assert bank.class_noun == "car"
