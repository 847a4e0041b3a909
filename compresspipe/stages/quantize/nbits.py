"""Group-wise 4-bit weights for Linear and transformers' Conv1D layers, in ONNX Runtime's MatMulNBits layout.

`y = x @ B + bias` with B = the layer's weight as a [in, out] matrix (a Linear's weight transposed, a GPT-2
Conv1D's weight as it is), stored as 4-bit integers in blocks of `block_size` values along `in`, with one float
scale and one zero point per block and output. The integers, scales and zero points are computed by ONNX Runtime's
own quantizers, the ones that write the `onnx_int4` file, so the PyTorch row and the shipped file hold the same
weights:

- `rtn`: round-to-nearest (`DefaultWeightOnlyQuantizer`), 4-bit zero points;
- `hqq`: Half-Quadratic Quantization (`HQQWeightOnlyQuantizer`, Badri & Shaji 2023): scales and float zero
  points fitted per block by a proximal solver that minimises the weights' lp error (p < 1, robust to outliers),
  without calibration data; MatMulNBits reads its zero points as floats.

In PyTorch the weights are dequantized once and the compute stays float (no CPU speed-up there); the speed comes
from ONNX Runtime's MatMulNBits kernels (export format onnx_int4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compresspipe.errors import ArtifactError

BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits accepts
ALGORITHMS = ("rtn", "hqq")


def is_conv1d(layer: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored [in, out]; recognised without importing
    transformers."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and getattr(layer, "weight", None) is not None


def matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as MatMul's B: [in, out]."""
    w = getattr(layer, "weight").detach().float()  # noqa: B009 - an nn.Module attribute, typed as a tensor here
    return w if is_conv1d(layer) else w.t()


def block_quant(b: np.ndarray, block_size: int, symmetric: bool = False,
                algorithm: str = "rtn") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX Runtime's 4-bit block quantization of B [K, N]: (packed [N, blocks, block/2] uint8, scales [N, blocks],
    zero points: rtn packed [N, ceil(blocks/2)] uint8, hqq float32 [N, blocks])."""
    if algorithm == "hqq":
        return _hqq_block_quant(b, block_size)
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size,
                                                                        is_symmetric=symmetric))
    packed, scales, zeros = quantizer.qbits_block_quant(np.ascontiguousarray(b, dtype=np.float32))
    return packed, scales, zeros


def _hqq_block_quant(b: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ONNX Runtime's HQQ quantizer writes for a MatMul weight B [K, N] (its `quantize`, on the CPU)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantizer,
    )

    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=4))
    q, scales, zeros = quantizer.quantize_internal(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).T,
                                                   bits=4, group_size=block_size)
    q = q.contiguous()
    packed = torch.zeros((q.shape[0], q.shape[1] // 2), dtype=torch.uint8)
    quantizer.pack_on_row_fast_248bit(packed, q, 4)
    n, blocks = scales.shape
    return (packed.reshape(n, blocks, block_size // 2).numpy(), scales.contiguous().numpy(),
            zeros.contiguous().numpy())


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte, the low nibble first."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


class DequantizedWeight(nn.Module):
    """A layer holding integer weights that computes with their float dequantization (`weight()`), built once and
    cached; rebuilt after loading or moving, never saved or copied, and rebuilt from the integer buffers while a
    tracer records the forward, so exported files keep the integers and their dequantization."""

    _dequantized: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _float_weight(self) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.weight()
        if self._dequantized is None:
            with torch.inference_mode(False):  # a cache built under inference_mode would refuse autograd later
                self._dequantized = self.weight()
        return self._dequantized

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._dequantized = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .cuda(), .half(): buffers change
        self._dequantized = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_dequantized"] = None
        return state


class QuantMatMulNBits(DequantizedWeight):
    """A Linear (or Conv1D) with 4-bit group-wise weights, as ONNX Runtime's MatMulNBits holds them."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    fbias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, block_size: int = 32,
                 conv1d: bool = False, algorithm: str = "rtn"):
        super().__init__()
        if bits != 4:
            raise ArtifactError(f"QuantMatMulNBits holds 4-bit weights (got bits {bits})")
        if block_size not in BLOCK_SIZES:
            raise ArtifactError(f"block_size {block_size}; MatMulNBits takes {', '.join(map(str, BLOCK_SIZES))}")
        self.in_features, self.out_features, self.bits, self.block_size = in_features, out_features, bits, block_size
        if algorithm not in ALGORITHMS:
            raise ArtifactError(f"algorithm {algorithm!r}; QuantMatMulNBits holds {', '.join(ALGORITHMS)}")
        self.conv1d, self.algorithm = conv1d, algorithm
        blocks = -(-in_features // block_size)
        self.register_buffer("qweight", torch.zeros(out_features, blocks, block_size // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, blocks))
        if algorithm == "hqq":  # float zero points, one per block
            self.register_buffer("zero_points", torch.zeros(out_features, blocks))
        else:  # 4-bit zero points, two per byte
            self.register_buffer("zero_points", torch.zeros(out_features, -(-blocks // 2), dtype=torch.uint8))
        self.register_buffer("fbias", torch.zeros(out_features) if bias else None)
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def from_float(cls, layer: nn.Module, block_size: int, algorithm: str = "rtn") -> QuantMatMulNBits:
        b = matrix(layer)
        k, n = b.shape
        new = cls(k, n, getattr(layer, "bias", None) is not None, 4, block_size, conv1d=is_conv1d(layer),
                  algorithm=algorithm)
        packed, scales, zeros = block_quant(b.numpy(), block_size, algorithm=algorithm)
        new.qweight.copy_(torch.from_numpy(packed))
        new.scales.copy_(torch.from_numpy(scales))
        new.zero_points.copy_(torch.from_numpy(zeros))
        if new.fbias is not None:
            new.fbias.copy_(getattr(layer, "bias").detach().float())  # noqa: B009 - as in matrix()
        return new

    def int_weight(self) -> torch.Tensor:
        """The 4-bit integers (0..15) as [out, in]."""
        return _unpack(self.qweight).reshape(self.out_features, -1)[:, : self.in_features]

    def weight(self) -> torch.Tensor:
        """The dequantized weight as a Linear holds it, [out, in] (what metrics count)."""
        blocks = self.scales.shape[1]
        q = _unpack(self.qweight).float()  # [out, blocks, block]
        zero = self.zero_points if self.algorithm == "hqq" else _unpack(self.zero_points)[:, :blocks].float()
        w = (q - zero.unsqueeze(-1)) * self.scales.unsqueeze(-1)
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    def bias(self) -> torch.Tensor | None:
        return self.fbias

    def to_float(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, self.fbias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.weight())
            if self.fbias is not None and layer.bias is not None:
                layer.bias.copy_(self.fbias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._float_weight()
        b = self.fbias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)

    def spec(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.fbias is not None, "bits": self.bits, "block_size": self.block_size,
                "conv1d": self.conv1d, "algorithm": self.algorithm}

    def extra_repr(self) -> str:
        return (f"int{self.bits} {self.algorithm}, block {self.block_size}, in={self.in_features}, "
                f"out={self.out_features}")
