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

    ``projections[i]`` is the ``to_k`` or ``to_v`` of attn2 layer ``names[i]`` (``"<layer>.to_k"``); their
    weights are rows of one trainable fp32 ``weight`` (views in their place in the UNet), or each is replaced
    there by a :class:`LowRankLinear` (``rank`` > 0).
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
                self.names.append(f"{layer}.{proj}")
                self.projections.append(mod)
        #: output width of every projection, in order: ``project`` returns them side by side
        self.sizes = [int((mod.base if rank else mod).weight.shape[0]) for mod in self.projections]
        self.weight = None if rank else self._flat_weight()
        self.rows = nn.ParameterList()
        for encoder in encoders:
            emb = encoder.get_input_embeddings()
            row = nn.Parameter(emb.weight[token_id].detach().float().clone())
            emb.register_forward_hook(self._put_row(row))
            self.rows.append(row)

    def _flat_weight(self) -> nn.Parameter:
        """Every ``to_k``/``to_v`` weight as one fp32 parameter ``[sum of widths, D]``; each module's weight
        becomes a frozen view of its rows (the UNet, checkpoints and extraction read them there), so the
        optimizer, clipping and the projection of a step each see one tensor instead of 2 per layer."""
        flat = nn.Parameter(torch.cat([mod.weight.detach().float() for mod in self.projections]))
        for mod, rows in zip(self.projections, flat.detach().split(self.sizes), strict=True):
            mod.weight = nn.Parameter(rows, requires_grad=False)
        return flat

    def project(self, context: torch.Tensor) -> torch.Tensor:
        """The concept flow's K and V of every attn2 layer in one tensor: ``context`` [B, 77, D] ->
        ``[B, 77, sum of widths]``, the widths in the order of ``names`` (one matmul for all layers)."""
        if self.weight is None:
            return torch.cat([mod(context) for mod in self.projections], dim=-1)
        weight = self.weight
        if not torch.is_autocast_enabled(context.device.type):
            weight = weight.to(context.dtype)
        return F.linear(context, weight)

    def _put_row(self, row: nn.Parameter):
        def hook(module, inputs, output):
            hit = (inputs[0] == self.token_id).unsqueeze(-1)
            return torch.where(hit, row.to(output.dtype), output)

        return hook

    def kv_parameters(self) -> dict[str, torch.Tensor]:
        """The trained K/V tensors by name (``<layer>.to_k.weight``: views of the flat weight; or ``.lora_A`` /
        ``.lora_B``): what checkpoints and ``kv.safetensors`` hold."""
        if self.weight is not None:
            return {f"{name}.weight": mod.weight for name, mod in zip(self.names, self.projections, strict=True)}
        return {f"{name}.{pname}": p for name, mod in zip(self.names, self.projections, strict=True)
                for pname, p in mod.named_parameters() if p.requires_grad}

    def trainable(self) -> list[nn.Parameter]:
        """Every trainable tensor, in a fixed order: the flat K/V weight (or the LoRA factors), then the rows."""
        kv = [self.weight] if self.weight is not None else list(self.kv_parameters().values())
        return [*kv, *self.rows]

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
