"""LoRA layers: a low-rank update added to a frozen linear map, in place inside the model's blocks.

``swapped = add_lora(block, targets=("q_proj", "v_proj"), r=8, alpha=16)``; ``merge_lora(model)`` folds the
update back into plain ``nn.Linear`` / ``Conv1D`` layers (for ``save_pretrained``).

A :class:`LoRALinear` *adopts* the weight and bias of the layer it replaces (the same ``Parameter``
objects, not copies), so the base weights keep their state-dict names (``...q_proj.weight``) and only
``...q_proj.lora_A`` / ``...q_proj.lora_B`` are new. It replaces the layer where it sits, inside its
transformer block, so the ``zo2_offload`` strategy streams it with the block. Plain torch and
transformers' ``Conv1D``; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * x A^T B^T`` with the base weight frozen (Hu et al., 2021).

    A is drawn like ``nn.Linear``'s default weight (Kaiming uniform, as loralib and MeZO do), B is zero,
    so at construction the layer computes exactly what ``base`` did.

    Args:
        base: the ``nn.Linear`` (weight ``(out, in)``) or GPT-2 ``Conv1D`` (weight ``(in, out)``) to wrap.
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        generator: draws A (a seeded one makes the layer reproducible).

    Raises:
        TypeError: for a layer that is neither ``nn.Linear`` nor ``Conv1D``.
        ValueError: for ``r < 1``.
    """

    def __init__(
        self, base: nn.Module, r: int = 8, alpha: float = 16, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"LoRA wraps nn.Linear or transformers' Conv1D, not {type(base).__name__}.")
        if r < 1:
            raise ValueError(f"LoRA rank r={r}: use r >= 1.")
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D stores its weight as (in, out)
        self.weight = base.weight
        self.bias = base.bias
        in_features, out_features = self.weight.shape if self.fan_in_fan_out else self.weight.shape[::-1]
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(self.weight.new_empty(r, in_features))
        self.lora_B = nn.Parameter(self.weight.new_zeros(out_features, r))
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the wrapped layer computes, op for op (so the output at B = 0 is bitwise the same)."""
        if self.fan_in_fan_out:  # transformers' Conv1D.forward
            out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (..., out)

    def merged(self) -> nn.Module:
        """A plain layer of the base type whose weight includes the update (for export)."""
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        if self.fan_in_fan_out:
            layer = Conv1D(self.out_features, self.in_features)
            delta = delta.T
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer = layer.to(device=self.weight.device, dtype=self.weight.dtype)
        layer.weight = nn.Parameter((self.weight + delta).detach(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}"


def add_lora(
    root: nn.Module, targets: Sequence[str], r: int, alpha: float, generator: torch.Generator | None = None
) -> list[str]:
    """Replace every ``nn.Linear`` / ``Conv1D`` under ``root`` whose attribute name is in ``targets``.

    Args:
        root: the module to search (a transformer block).
        targets: attribute names of the layers to adapt (``q_proj``, ``v_proj``; ``c_attn`` in GPT-2).
        r, alpha, generator: see :class:`LoRALinear`.

    Returns:
        The qualified names (under ``root``) of the layers replaced.
    """
    found = [(name, module) for name, module in root.named_modules()
             if name.rpartition(".")[2] in targets and isinstance(module, (nn.Linear, Conv1D))]
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, LoRALinear(module, r=r, alpha=alpha, generator=generator))
    return [name for name, _ in found]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` of ``model`` back into a plain layer, in place.

    The state-dict names of the base weights are unchanged, so the result saves and loads as the original
    architecture (``save_pretrained``). Outputs equal the LoRA model's up to rounding of ``W + s * B A``.

    Returns:
        ``model``.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.merged())
    return model
