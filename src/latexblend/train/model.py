"""What Stage 1 trains (METHOD.md section 2): :class:`ConceptFlow`, one ``nn.Module`` holding the concept flow's
``to_k``/``to_v`` of every ``attn2`` layer (fp32 master weights, or LoRA factors with ``--kv-rank``) and the
identifier's embedding row in both text encoders. Everything else in the pipeline stays frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latexblend.errors import LatexBlendError
from latexblend.models import attn2_modules
from latexblend.text import ENCODERS


def merge_lora(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The effective weight ``W0 + B A`` (fp32) of LoRA factors ``A`` [r, in], ``B`` [out, r] on ``W0`` [out, in]."""
    return w0.float() + lora_b.float() @ lora_a.float()


class LowRankLinear(nn.Module):
    """``W0 x + B (A x)`` with ``W0`` frozen and ``B`` initialised to zero (``--kv-rank``)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        return merge_lora(self.base.weight, self.lora_A, self.lora_B)


class ConceptFlow(nn.Module):
    """The trainables of one concept, taken out of (and still used inside) a frozen pipeline.

    ``projections[i]`` is the ``to_k`` or ``to_v`` of attn2 layer ``names[i]`` (``"<layer>.to_k"``), made
    trainable in fp32 in its place in the UNet, or replaced there by a :class:`LowRankLinear` (``rank`` > 0).
    ``rows[j]`` is the identifier's embedding row of text encoder ``j`` (fp32), put in place of the frozen
    row by a forward hook on the input embedding (``[B, 77] ids -> [B, 77, D]``), so no other row can change.
    """

    def __init__(self, unet, encoders, token_id: int, rank: int = 0):
        super().__init__()
        self.token_id, self.rank = token_id, rank
        self.names: list[str] = []
        self.projections = nn.ModuleList()
        for layer, attn in attn2_modules(unet).items():
            if attn.norm_cross:
                raise LatexBlendError(f"{layer} normalises its text context; only SDXL-style attn2 is supported")
            for proj in ("to_k", "to_v"):
                mod = getattr(attn, proj)
                if rank:
                    mod = LowRankLinear(mod, rank)
                    setattr(attn, proj, mod)
                else:
                    mod.to(torch.float32).weight.requires_grad_(True)
                self.names.append(f"{layer}.{proj}")
                self.projections.append(mod)
        self.rows = nn.ParameterList()
        for encoder in encoders:
            emb = encoder.get_input_embeddings()
            row = nn.Parameter(emb.weight[token_id].detach().float().clone())
            emb.register_forward_hook(self._put_row(row))
            self.rows.append(row)

    def _put_row(self, row: nn.Parameter):
        def hook(module, inputs, output):
            hit = (inputs[0] == self.token_id).unsqueeze(-1)
            return torch.where(hit, row.to(output.dtype), output)

        return hook

    def kv_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable K/V tensors by name (``<layer>.to_k.weight``, or ``.lora_A`` / ``.lora_B``)."""
        return {f"{name}.{pname}": p for name, mod in zip(self.names, self.projections, strict=True)
                for pname, p in mod.named_parameters() if p.requires_grad}

    def trainable(self) -> list[nn.Parameter]:
        """Every trainable tensor, in a fixed order: the K/V tensors, then the rows."""
        return [*self.kv_parameters().values(), *self.rows]

    def row_tensors(self) -> dict[str, torch.Tensor]:
        """The identifier rows by text encoder (the keys of ``tokens.safetensors``), on the CPU."""
        return {name: row.detach().cpu().contiguous() for name, row in zip(ENCODERS, self.rows, strict=True)}

    def weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Effective fine-tuned ``(W_k, W_v)`` per attn2 layer (fp32)."""
        mods = dict(zip(self.names, self.projections, strict=True))

        def w(mod):
            return (mod.merged_weight() if isinstance(mod, LowRankLinear) else mod.weight.float()).detach()

        layers = dict.fromkeys(name.rsplit(".", 1)[0] for name in self.names)
        return {layer: (w(mods[f"{layer}.to_k"]), w(mods[f"{layer}.to_v"])) for layer in layers}

    @torch.no_grad()
    def load(self, kv: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors (a checkpoint's ``kv`` and ``tokens`` files) into place."""
        for name, p in self.kv_parameters().items():
            p.copy_(kv[name])
        for key, row in zip(ENCODERS, self.rows, strict=True):
            row.copy_(rows[key])
