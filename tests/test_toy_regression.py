"""A regression test of the method on the trained toy model: a concept the toy model has never drawn
(stripecar: a car, blue over purple) appears in new scenes only through its bank.

Training seed 0 with the toy recipe (train.options.RECIPES["toy"]): on these 16 images the concept is
present in 100% with its bank (its two colours on a car: 100%) and 0% without (colours: 12%).
The thresholds sit well below the measured rate with the bank and well above the rate without one, so
a break anywhere in train / extract / blend on a trained model fails this test; the rates themselves
move with the seed and the prompts (docs/TOY.md: 59% for stripecar over the benchmark's 8 prompts).
"""

from __future__ import annotations

from benchmarks.fidelity import PROMPTS as BENCH_PROMPTS
from benchmarks.fidelity import FidelitySettings, generate_rows, summarise, train_variant

from latexblend.toy.world import draw_data

PROMPTS = BENCH_PROMPTS["car"][:4]  # the car alone on each background


def test_a_trained_concept_appears_in_new_scenes_only_with_its_bank(tmp_path, monkeypatch):
    from latexblend.models import load_pipeline

    monkeypatch.setenv("LATEXBLEND_HOME", str(tmp_path / "home"))
    settings = FidelitySettings(concepts=["stripecar"], seeds=4, quality=False, seed=0)
    data = draw_data(tmp_path, "stripecar", settings.num_images, settings.num_prior, settings.seed)
    bank = train_variant(tmp_path, "stripecar", "full", settings, data)
    pipe = load_pipeline("toy", device="cpu", dtype="fp32")
    with_bank = summarise(generate_rows(pipe, PROMPTS, settings.seeds, settings, ["stripecar"], [bank])[0])
    without = summarise(generate_rows(pipe, PROMPTS, settings.seeds, settings, ["stripecar"], None)[0])
    print(f"stripecar present: {with_bank['concept_pct']:.0f}% with the bank, {without['concept_pct']:.0f}% without; "
          f"colours {with_bank['concept_colours_pct']:.0f}% / {without['concept_colours_pct']:.0f}%")
    assert with_bank["concept_pct"] >= 60 and with_bank["concept_colours_pct"] >= 60, with_bank  # measured 100 / 100
    assert without["concept_pct"] <= 15 and without["concept_colours_pct"] <= 25, without  # measured 0 / 12
    assert bank.class_noun == "car"
