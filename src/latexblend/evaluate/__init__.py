"""Evaluation: the paper's metrics (CLIP-T, CLIP-I, DINO: :mod:`~latexblend.evaluate.metrics`), their report
(:mod:`~latexblend.evaluate.report`) and the CustomConcept101 protocol (:mod:`~latexblend.evaluate.cc101`)."""

#: The metric models of the paper's protocol (Custom Diffusion's CustomConcept101).
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
