"""A regression test of the method on the trained toy model: a concept trained for a few hundred
steps shows up (exact detector) in most blended images of new prompts, and never without its bank."""

from __future__ import annotations

import pytest

from latexblend import toy
from latexblend.fidelity import TOY_RECIPE, FidelitySettings, generate_rows, summarise, train_variant
from latexblend.toy import draw_data
from latexblend.toymodel import ASSETS

pytestmark = pytest.mark.skipif(not (ASSETS / "toy.json").exists(), reason="package built without toy weights")

PROMPTS = ["a dog on the beach", "a dog in the snow", "a dog at night", "a dog next to a red car on the grass"]


def test_trained_concept_appears_in_new_scenes_only_with_its_bank(tmp_path, monkeypatch):
    from latexblend.models import load_pipeline

    monkeypatch.setenv("LATEXBLEND_HOME", str(tmp_path / "home"))
    settings = FidelitySettings(concepts=["patchdog"], steps=TOY_RECIPE["steps"], lr=TOY_RECIPE["lr"], seeds=3,
                                quality=False)
    data = draw_data(tmp_path, "patchdog", settings.num_images, settings.num_prior, settings.seed)
    bank = train_variant(tmp_path, "patchdog", "full", settings, data)
    pipe = load_pipeline("toy", device="cpu", dtype="fp32")
    with_bank = summarise(generate_rows(pipe, PROMPTS, settings.seeds, settings, ["patchdog"], [bank])[0])
    without = summarise(generate_rows(pipe, PROMPTS, settings.seeds, settings, ["patchdog"], None)[0])
    assert without["concept_pct"] == 0
    assert with_bank["concept_pct"] >= REGRESSION_MIN_CONCEPT_PCT, with_bank
    assert toy.CONCEPTS["patchdog"].cls == bank.class_noun


REGRESSION_MIN_CONCEPT_PCT = 50
