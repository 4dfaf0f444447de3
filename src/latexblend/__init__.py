"""latexblend: multi-concept customized generation by latent textual blending (LatexBlend, CVPR 2025).

Import is cheap: heavy libraries (torch, diffusers) load only when a stage needs them.

    >>> import latexblend
    >>> blender = latexblend.apply(pipe, ["corgi", "castle"])   # doctest: +SKIP
"""

__version__ = "0.1.0"

from latexblend.errors import LatexBlendError  # noqa: E402

__all__ = ["LatexBlendError", "__version__", "apply", "load_bank", "save_bank", "load_pipeline"]

_LAZY = {"apply": "latexblend.blend.blender", "load_bank": "latexblend.bank.format",
         "save_bank": "latexblend.bank.format", "load_pipeline": "latexblend.models"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latexblend' has no attribute {name!r}")
