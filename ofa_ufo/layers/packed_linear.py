"""bf16 Linear layers whose weights are kept in oneDNN's packed layout for inference on a CPU.

A bf16 `F.linear` on a CPU with AMX re-lays its weight into oneDNN's blocked format on every call. At
batch 1 decoding that is most of the call (the weight is read, written and read again): a 768 x 3072
layer at 5 rows took about 190 us against about 100 us with the weight packed once (Xeon with AMX,
2 threads). `pack_linears(model)` turns each `nn.Linear` into a `PackedLinear`, which packs its weight
on the first forward without gradients over at most 256 rows (decoding; longer inputs take the plain
kernel) and reuses it until the weight changes (an in-place update that bumps its version counter, such as
`load_state_dict`; a new tensor, as `.to()` makes; or any forward with gradients, which a training step
takes before its optimizer updates the weights in place). Outputs equal the unpacked layer's up to the
rounding of the bf16 result (oneDNN may sum in another order). A weight written behind autograd's back
(`param.data.copy_(...)`) with no forward with gradients in between is not seen, so `pack_linears` is for
models that serve (`from_pretrained(..., precision="bf16")` and the pipeline call it). With gradients, in
fp32, or where oneDNN cannot pack, it is a plain `nn.Linear`. Parameters and state dicts are unchanged; the
packed copy (kept beside the module, `ofa_ufo.layers.inference_cache`) costs as much memory again as the
bf16 weights of the layers that decoded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ofa_ufo.layers.inference_cache import cache_of, kept

__all__ = ["PackedLinear", "can_pack", "pack_linears", "tracing"]

# Calls with more rows than this run the plain kernel: the per-call re-layout is then a small share of the
# work, and oneDNN's packed kernel was slower at some shapes (Xeon with AMX, 2 threads, 584 rows: 768 -> 768
# 0.68 against 0.46 ms, 3072 -> 768 2.7 against 1.6 ms), so the encoder at one image ran faster without it.
_PACKED_MAX_ROWS = 256


def can_pack() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear kernels."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def tracing() -> bool:
    """Whether this forward is being traced or compiled (ONNX export, torch.jit, torch.compile): a graph
    gets the plain computation, never a cache or a oneDNN-only kernel."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class PackedLinear(nn.Linear):
    """`nn.Linear` that computes bf16 inference on a CPU from a packed copy of its weight (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (torch.is_grad_enabled() or weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16
                or weight.device.type != "cpu" or tracing()):
            # a forward with gradients precedes an optimizer step, and fused optimizers update the weight
            # without bumping its version counter: drop the packed copy
            cache_of(self).pop("packed", None)
            return F.linear(x, weight, self.bias)
        if x.numel() > _PACKED_MAX_ROWS * x.shape[-1]:
            return F.linear(x, weight, self.bias)
        packed = kept(self, "packed", (weight,), lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `PackedLinear` (in place); returns how many. Does nothing
    where oneDNN's packed kernels are missing. Quantised or other Linear subclasses are left alone."""
    if not can_pack():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
            count += 1
    return count
