"""Quantization backends behind one interface: can it run here, which methods, and how weights are rounded.

Every torch-side backend produces the same tensor-only layers (`.layers`, a float emulation of int8 in
PyTorch), so artifacts, reloads and the report do not depend on the backend; what differs is who computes
the integer weights and scales. `onnxruntime` produces no torch model: it hands the job to the export stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from compresspipe.errors import StageConfigError
from compresspipe.stages.quantize import BACKEND_METHODS, WHY_NOT

if TYPE_CHECKING:
    import torch

# method -> backend `auto` uses: torch's emulation layers (or casts) for every method; see the package docstring
AUTO: dict[str, str] = {m: "torch" for m in ("dynamic", "static", "qat", "weight_only", "fp16", "bf16")}


class QuantBackend(Protocol):
    name: str
    export_only: bool

    def available(self) -> str | None:
        """None when this backend runs on this machine, else the reason it does not."""

    def supports(self, method: str, dtype: str) -> bool:
        """Whether this backend implements `method` with weight `dtype` at all."""

    def quantize_weight(self, w: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer weights as int8, float32 scales per output channel or one), symmetric."""


class TorchBackend:
    """Our rounding into the float-emulation layers (core ATen ops: runs wherever torch does); fp16/bf16: casts."""

    name, export_only = "torch", False

    def available(self) -> str | None:
        return None

    def supports(self, method: str, dtype: str) -> bool:
        return method in BACKEND_METHODS["torch"] and (dtype == "int8" or method == "weight_only")

    def quantize_weight(self, w: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from compresspipe.stages.quantize.layers import quantize_weight

        return quantize_weight(w, bits, per_channel)


class TorchaoBackend:
    """torchao's affine quantization primitives for weight-only int8/int4 (stored in the same layers)."""

    name, export_only = "torchao", False

    def available(self) -> str | None:
        try:
            from torchao.quantization.quant_primitives import (  # noqa: F401
                MappingType,
                choose_qparams_affine,
                quantize_affine,
            )
        except Exception as exc:  # not installed, or built against another torch
            return f"torchao cannot be imported ({type(exc).__name__}: {exc}); pip install torchao"
        return None

    def supports(self, method: str, dtype: str) -> bool:
        return method in BACKEND_METHODS["torchao"]

    def quantize_weight(self, w: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

        w = w.detach().float()
        flat = w.reshape(w.shape[0], -1)
        block = (1, flat.shape[1]) if per_channel else tuple(flat.shape)
        lo, hi = (-8, 7) if bits == 4 else (-128, 127)
        scale, zero = choose_qparams_affine(flat, MappingType.SYMMETRIC, block, torch.int8, lo, hi,
                                            eps=1e-12, scale_dtype=torch.float32)
        q = quantize_affine(flat, block, scale, zero, torch.int8, lo, hi)
        return q.reshape(w.shape), scale.reshape(-1).float()


class OnnxRuntimeBackend:
    """ONNX Runtime quantization of the exported graph: recorded here, done by the export stage (onnx_int8)."""

    name, export_only = "onnxruntime", True

    def available(self) -> str | None:
        try:
            import onnxruntime.quantization  # noqa: F401
        except Exception as exc:
            return f"onnxruntime cannot be imported ({type(exc).__name__}: {exc}); pip install onnxruntime"
        return None

    def supports(self, method: str, dtype: str) -> bool:
        return method in BACKEND_METHODS["onnxruntime"] and dtype == "int8"

    def quantize_weight(self, w: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("onnxruntime quantizes the exported graph, not torch weights")


BACKENDS: dict[str, QuantBackend] = {b.name: b for b in (TorchBackend(), TorchaoBackend(), OnnxRuntimeBackend())}


def resolve(stage: str, method: str, dtype: str, backend: str) -> QuantBackend:
    """The backend to use, or StageConfigError (exit 2) naming why the asked one cannot run here."""
    name = AUTO[method] if backend == "auto" else backend
    chosen = BACKENDS[name]
    if not chosen.supports(method, dtype):
        raise StageConfigError(stage, f"backend {name} cannot run method {method} with dtype {dtype}; "
                                      f"{WHY_NOT.get(name, 'use backend: auto')}")
    reason = chosen.available()
    if reason is not None:
        raise StageConfigError(stage, f"backend {name} cannot run method {method} on this machine: {reason}")
    return chosen
