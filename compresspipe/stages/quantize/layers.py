"""Quantized and reduced-precision layers whose state is plain tensors, and the `quantize` edit kind.

These layers keep int8 (or packed int4) weights, float scales, a float bias and calibrated activation
ranges as buffers, so an artifact is model.safetensors + model.json: the `quantize` edit swaps the float
layers for these with empty buffers of the right shapes, then the weights load strictly.

In PyTorch they are a float emulation of int8: the forward pass computes exactly the int8 file's rounding
(the int weights times their scales; activations rounded and clamped to their uint8 grid) with core ATen
float ops. That is what every exporter traces and what every device runs, but it is not faster than
float32: the int8 speed comes from the deploy runtime (export formats onnx_int8, executorch_int8). torch's
own int8 kernels (torch.ops.quantized, quint8 tensors, torch.ao) are deprecated and not used.

Every layer takes and returns tensors of the caller's float dtype, so any model works whatever surrounds
the layer (residual additions, BatchNorm left in float, custom code).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from compresspipe.artifacts.edits import (
    FLOAT_DTYPES,
    MAX_DIM,
    EditKind,
    EditModel,
    KwValue,
    dtype_from_name,
    dtype_name,
    get_submodule,
    set_submodule,
)
from compresspipe.errors import ArtifactError
from compresspipe.runtimes.observers import ACT_QMAX, act_qparams  # noqa: F401 - the layers' activation grid
from compresspipe.stages.quantize.nbits import DequantizedWeight, QuantMatMulNBits

ACT_CLAMP = 255  # activation scales span ACT_QMAX steps, but values still clamp at uint8's 255, as quint8 tensors and ONNX QuantizeLinear do
# dynamic mode: the smallest per-batch input scale (torch's ChooseQuantizationParams, which the artifacts
# written with its int8 kernels used)
DYNAMIC_MIN_SCALE = 6.1e-5
WEIGHT_QRANGE = {8: (-128, 127), 4: (-8, 7)}
MODES = ("static", "dynamic", "weight_only")


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int quantization: (int8 values, float32 scale per output channel or one)."""
    lo, hi = WEIGHT_QRANGE[bits]
    w = w.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1) if per_channel else w.abs().max().reshape(1)
    scale = (amax / hi).clamp(min=1e-12)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.reshape(shape)).clamp(lo, hi).to(torch.int8)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values per byte along the flattened input dimension (padded to even)."""
    flat = q.reshape(q.shape[0], -1).to(torch.int16) & 0xF
    if flat.shape[1] % 2:
        flat = F.pad(flat, (0, 1))
    return (flat[:, 0::2] | (flat[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    flat = torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)[:, : math.prod(shape[1:])]
    flat = torch.where(flat > 7, flat - 16, flat)
    return flat.to(torch.int8).reshape(shape)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 quantize-dequantize in core ATen ops (what torch.fake_quantize_per_tensor_affine computes).

    Spelled out so every exporter takes it: torch.export (and so the dynamo ONNX exporter) cannot capture
    the fused op with tensor scales, and ExecuTorch lowers core ATen only.
    """
    inv = 1.0 / scale.to(x.dtype)
    zp = zero_point.to(x.dtype)
    unclamped = torch.round(x * inv) + zp
    out = (torch.clamp(unclamped, 0, ACT_CLAMP) - zp) * scale.to(x.dtype)
    if x.requires_grad and not torch.compiler.is_exporting():  # the fused op's gradient: 1 on the grid, else 0
        mask = ((unclamped >= 0) & (unclamped <= ACT_CLAMP)).to(x.dtype)
        out = x * mask + (out - x * mask).detach()
    return out


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of one batch for dynamic mode: asymmetric uint8 (7-bit) over its min/max and zero.

    What torch's dynamic int8 Linear chose per call (reduce_range), so artifacts written with it compute as
    before; tensor ops, so tracing keeps the per-batch range.
    """
    x = x.detach()
    lo, hi = torch.clamp(x.amin().float(), max=0.0), torch.clamp(x.amax().float(), min=0.0)
    scale = (hi - lo) / ACT_QMAX
    zero_point = torch.clamp(torch.round(-lo / torch.clamp(scale, min=1e-30)), 0, ACT_QMAX)
    return torch.clamp(scale, min=DYNAMIC_MIN_SCALE), zero_point


class QuantLayer(DequantizedWeight):
    """Shared storage: int weights (int8, or int4 packed in uint8), per-channel scales, float bias."""

    # buffers (declared for type checkers: nn.Module.__getattr__ would type them as Tensor | Module)
    qweight: torch.Tensor
    weight_scale: torch.Tensor
    fbias: torch.Tensor | None
    input_scale: torch.Tensor
    output_scale: torch.Tensor
    input_zero_point: torch.Tensor
    output_zero_point: torch.Tensor

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, mode: str, bits: int = 8,
                 per_channel: bool = True, relu: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ArtifactError(f"unknown quantized layer mode {mode!r}; known: {', '.join(MODES)}")
        if bits not in WEIGHT_QRANGE or (bits == 4 and mode != "weight_only"):
            raise ArtifactError(f"{bits}-bit weights are not supported in mode {mode}")
        self.mode, self.bits, self.per_channel, self.relu = mode, bits, per_channel, relu
        self.weight_shape = tuple(int(s) for s in weight_shape)
        out = self.weight_shape[0]
        if bits == 4:
            inner = math.prod(self.weight_shape[1:])
            self.register_buffer("qweight", torch.zeros(out, (inner + 1) // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(self.weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out if per_channel else 1))
        self.register_buffer("fbias", torch.zeros(out) if bias else None)
        if mode == "static":
            for name in ("input_scale", "output_scale"):
                self.register_buffer(name, torch.ones(()))
            for name in ("input_zero_point", "output_zero_point"):
                self.register_buffer(name, torch.zeros((), dtype=torch.int32))
        self._dequantized: torch.Tensor | None = None  # the float weight, built at first use, never saved

    # -- filling from a float layer ----------------------------------------------------------------

    def set_weight(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.qweight.copy_(pack_int4(q) if self.bits == 4 else q.reshape(self.weight_shape))
        self.weight_scale.copy_(scale.reshape(-1))
        if self.fbias is not None and bias is not None:
            self.fbias.copy_(bias.detach().float())
        self._dequantized = None

    def set_activation_ranges(self, inp: tuple[float, int], out: tuple[float, int]) -> None:
        self.input_scale.fill_(inp[0])
        self.input_zero_point.fill_(inp[1])
        self.output_scale.fill_(out[0])
        self.output_zero_point.fill_(out[1])

    # -- what metrics see: the logical float weight and bias (count_params reads callables) -----------

    def int_weight(self) -> torch.Tensor:
        if self.bits == 4:
            return unpack_int4(self.qweight, self.weight_shape)
        return self.qweight

    def weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (len(self.weight_shape) - 1)
        return self.int_weight().float() * self.weight_scale.reshape(shape)

    def bias(self) -> torch.Tensor | None:
        return self.fbias

    def _float_layer(self) -> nn.Linear | nn.Conv2d:
        raise NotImplementedError

    def to_float(self) -> nn.Module:
        """The float layer with this layer's dequantized weights (and its fused ReLU after it): what an int8
        runtime re-quantizes when the weights themselves were trained for int8 (QAT)."""
        layer = self._float_layer()
        with torch.no_grad():
            layer.weight.copy_(self.weight())
            if self.fbias is not None and layer.bias is not None:
                layer.bias.copy_(self.fbias)
        return nn.Sequential(layer, nn.ReLU()) if self.relu else layer

    # -- forward: the float emulation of the int8 arithmetic -----------------------------------------

    def _float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._float_weight()
        b = self.fbias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        if self.mode == "static":
            x = fake_quant(x, self.input_scale, self.input_zero_point)
        elif self.mode == "dynamic":
            x = fake_quant(x, *dynamic_qparams(x))
        y = self._float_op(x, w, b)
        if self.relu:
            y = F.relu(y)
        if self.mode == "static":
            y = fake_quant(y, self.output_scale, self.output_zero_point)
        return y

    def spec(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "mode": self.mode, "bits": self.bits,
                "per_channel": self.per_channel, "relu": self.relu, "bias": self.fbias is not None}

    def extra_repr(self) -> str:
        return f"{self.mode}, int{self.bits}, weight={list(self.weight_shape)}, relu={self.relu}"


class QuantLinear(QuantLayer):
    """int8 Linear: static (calibrated ranges), dynamic (input range per batch) or weight-only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw: Any):
        super().__init__((out_features, in_features), bias, **kw)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(cls, layer: nn.Linear, mode: str, bits: int, per_channel: bool, relu: bool = False,
                   quantizer: Any = quantize_weight) -> QuantLinear:
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, mode=mode, bits=bits,
                  per_channel=per_channel, relu=relu)
        q, scale = quantizer(layer.weight, bits, per_channel)
        new.set_weight(q, scale, layer.bias)
        return new

    def _float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def _float_layer(self) -> nn.Linear | nn.Conv2d:
        return nn.Linear(self.in_features, self.out_features, self.fbias is not None)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "in_features": self.in_features, "out_features": self.out_features}


class QuantConv2d(QuantLayer):
    """int8 Conv2d (static or weight-only), zero padding; BatchNorm folded in beforehand."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, **kw: Any):
        pair = nn.modules.utils._pair
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        super().__init__((out_channels, in_channels // groups, *self.kernel_size), bias, **kw)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups

    @classmethod
    def from_float(cls, layer: nn.Conv2d, mode: str, bits: int, per_channel: bool, relu: bool = False,
                   quantizer: Any = quantize_weight) -> QuantConv2d:
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, mode=mode, bits=bits,
                  per_channel=per_channel, relu=relu)
        q, scale = quantizer(layer.weight, bits, per_channel)
        new.set_weight(q, scale, layer.bias)
        return new

    def _float_layer(self) -> nn.Linear | nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.fbias is not None)

    def _float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups}


class CastLinear(nn.Linear):
    """Linear with float16/bfloat16 weights; casts its input in and its output back to the caller's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class CastConv2d(nn.Conv2d):
    """Conv2d with float16/bfloat16 weights; casts its input in and its output back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def cast_layer(layer: Any, dtype: torch.dtype) -> nn.Module:
    if isinstance(layer, nn.Linear):
        new: nn.Module = CastLinear(layer.in_features, layer.out_features, layer.bias is not None)
    else:
        new = CastConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
    new.load_state_dict(layer.state_dict())
    return new.to(dtype)


def cast_spec(layer: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"class": type(layer).__name__, "dtype": dtype_name(layer.weight.dtype),
                            "bias": layer.bias is not None}
    if isinstance(layer, nn.Linear):
        spec.update(in_features=layer.in_features, out_features=layer.out_features)
    else:
        spec.update(in_channels=layer.in_channels, out_channels=layer.out_channels,
                    kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                    padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
                    dilation=list(layer.dilation), groups=layer.groups, padding_mode=layer.padding_mode)
    return spec


def layer_spec(layer: nn.Module) -> dict[str, Any]:
    if isinstance(layer, (QuantLayer, QuantMatMulNBits)):
        return layer.spec()
    if isinstance(layer, (CastLinear, CastConv2d)):
        return cast_spec(layer)
    raise ArtifactError(f"cannot record layer of type {type(layer).__name__} in a quantize edit")


_LAYER_KW = {"mode", "bits", "per_channel", "relu", "bias"}
_CONV_KW = {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"}
# class -> (constructor, the keyword arguments a spec may give it)
LAYER_CLASSES: dict[str, tuple[Any, frozenset[str]]] = {
    "QuantLinear": (QuantLinear, frozenset({"in_features", "out_features", *_LAYER_KW})),
    "QuantConv2d": (QuantConv2d, frozenset({*_CONV_KW, *_LAYER_KW})),
    "QuantMatMulNBits": (QuantMatMulNBits, frozenset({"in_features", "out_features", "bias", "bits", "block_size",
                                                      "conv1d", "algorithm"})),
    "CastLinear": (CastLinear, frozenset({"in_features", "out_features", "bias", "dtype"})),
    "CastConv2d": (CastConv2d, frozenset({*_CONV_KW, "bias", "dtype", "padding_mode"})),
}
_DIMS = ("in_features", "out_features", "in_channels", "out_channels", "groups")


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a layer from its spec with empty tensors (the weights load afterwards)."""
    kind = spec.get("class")
    if kind not in LAYER_CLASSES:
        raise ArtifactError(f"layer class {kind!r} in a quantize edit is not known; known: "
                            f"{', '.join(LAYER_CLASSES)}")
    cls, allowed = LAYER_CLASSES[kind]
    kw = {k: v for k, v in spec.items() if k != "class"}
    unknown = set(kw) - allowed
    if unknown:
        raise ArtifactError(f"{kind} in a quantize edit takes {', '.join(sorted(allowed))}; not "
                            f"{', '.join(sorted(unknown))}")
    for key in _DIMS:
        if key in kw and (type(kw[key]) is not int or not 0 < kw[key] <= MAX_DIM):
            raise ArtifactError(f"{kind} in a quantize edit: {key} must be a positive int (got {kw[key]!r})")
    dtype = None
    if "dtype" in kw:
        if kw["dtype"] not in FLOAT_DTYPES:
            raise ArtifactError(f"{kind} dtype {kw['dtype']!r}; allowed: {', '.join(FLOAT_DTYPES)}")
        dtype = dtype_from_name(kw.pop("dtype"))
    if isinstance(kw.get("padding"), list):
        kw["padding"] = tuple(kw["padding"])
    try:
        layer = cls(**kw)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ArtifactError(f"{kind} in a quantize edit cannot be built: {exc}") from None
    return layer.to(dtype) if dtype is not None else layer


class QuantizeEdit(EditModel):
    """{"kind": "quantize", "version": 1, "method": ..., "folded": [[conv, bn]], "layers": {name: spec}}"""

    method: Literal["dynamic", "static", "qat", "weight_only", "fp16", "bf16"]
    folded: list[tuple[str, str]] = Field(default_factory=list)
    layers: dict[str, dict[str, KwValue]]


def quantize_edit(method: str, layers: dict[str, nn.Module], folded: list[tuple[str, str]]) -> dict[str, Any]:
    return {"kind": "quantize", "version": QUANTIZE.version, "method": method, "folded": [list(p) for p in folded],
            "layers": {name: layer_spec(layer) for name, layer in layers.items()}}


def dequantized(model: nn.Module) -> nn.Module:
    """A float copy of a quantized model: every int8 layer back to a float layer with its dequantized weights."""
    import copy

    out = copy.deepcopy(model)
    for name, layer in list(out.named_modules()):
        if isinstance(layer, (QuantLayer, QuantMatMulNBits)):
            out = set_submodule(out, name, layer.to_float())
    return out.eval()


def _apply_quantize(model: nn.Module, edit: QuantizeEdit) -> nn.Module:
    from compresspipe.stages.graph import fold_target

    for _conv, bn in edit.folded:  # a fused BatchNorm+activation keeps its activation (the model's own modules)
        model = set_submodule(model, bn, fold_target(get_submodule(model, bn)))
    for name, spec in edit.layers.items():
        old = get_submodule(model, name)
        device = next((t.device for t in (*old.parameters(), *old.buffers())), None)
        new = build_layer(spec)
        model = set_submodule(model, name, new if device is None else new.to(device))
    return model


QUANTIZE = EditKind("quantize", 1, QuantizeEdit, _apply_quantize)
