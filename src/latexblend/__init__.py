"""latexblend: multi-concept customized generation by latent textual blending (LatexBlend, CVPR 2025).

Import is cheap: heavy libraries (torch, diffusers) load only when a stage needs them.
"""

__version__ = "0.1.0"

from latexblend.errors import LatexBlendError  # noqa: E402

__all__ = ["LatexBlendError", "__version__"]
