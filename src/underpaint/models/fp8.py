"""FP8 matrix products for the UNet's (FLUX: the transformer's) linear layers: ``--optimize fp8``.

Unlike the other speed switches this one **changes the picture**: a speed/quality trade-off for
GPUs with fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell), where
``torch._scaled_mm`` multiplies fp8 matrices at about twice the bf16 rate and the weights take
one byte each.

* **Weights**: each ``nn.Linear`` whose input and output widths are multiples of 16 (what
  ``_scaled_mm`` needs; others stay as they are) gets a ``float8_e4m3fn`` copy of its weight with
  one float32 scale per output channel (the row's largest magnitude maps to 448, e4m3's largest
  value). Layers that an fp8 checkpoint already keeps as ``float8_e4m3fn`` bytes
  (:class:`~underpaint.models.quantized.StoredLinear`) compute from those very bytes, with the
  file's per-tensor scale (1 for unscaled files) for every channel: nothing is quantized again.
  GGUF, bitsandbytes 4-bit and ``float8_e5m2`` layers are left as they are (``_scaled_mm`` has no
  use for the first two, and e5m2 weights would need an e4m3 requantization, a second rounding).
* **Activations**: quantized on every call, one scale per token (row), the same rule.
* **Product**: ``torch._scaled_mm`` with row-wise scales, in the tensor cores' fast accumulation
  mode (``use_fast_accum``: Hopper promotes partial sums to fp32 less often; fp8 inference
  libraries use it for forward passes; :data:`FAST_ACCUM`), written in the compute dtype.
  PyTorch's CUDA kernels for row-wise scales write only bf16 in older releases, also fp16 in
  newer ones, and fp32 only through cuBLAS on Hopper (CUDA 12.9+): :func:`output_dtype` tries the
  compute dtype once per device and falls back to bf16 plus a cast (for an fp16 model the extra
  bf16 rounding, 2⁻⁹ relative, is small beside fp8's own 2⁻⁴). Per-tensor scales would allow any
  output dtype, but one outlier in a token's activation would then cost every other token its
  precision. The bias is added afterwards in the compute dtype.
* **Memory**: the full-precision weight of a converted layer leaves the device: it is kept in
  host memory (``full_weight``, the very ``Parameter`` object), where LoRAs merge into it, and
  :func:`restore` puts it back where the layer's fp8 copy rests. Every ``--vram`` mode works: in
  ``low`` the fp8 copies rest in host memory and visit the device with their blocks (half the
  bytes of an fp16 visit). The host copy costs host RAM (2 bytes a weight in fp16/bf16) in
  exchange for an exact undo without reading the file again.
* **LoRAs**: merged into the host copies as into any weight; :func:`refresh` then quantizes the
  converted layers again in place (compiled code keeps the same buffers). It takes all of them,
  not only those a LoRA touched: one pass over the host copies after the merge and one after
  the restore, the price of a request with a LoRA. Layers computing from the checkpoint's own
  fp8 bytes take their LoRAs at run time, as stored layers always do.

The converted layers keep their identity: each changes class (:class:`Fp8Linear`, a
``nn.Linear``; :class:`Fp8StoredLinear`, a ``StoredLinear``) and back, so that a LoRA index,
fused projections, offload hooks and anything else holding the module stays valid.

On the CPU ``_scaled_mm`` accepts fp8 too (emulated, slower than the plain layers): that is how
the tests check this code; it is allowed there for that reason, not for speed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .quantized import StoredLinear

FP8 = torch.float8_e4m3fn
#: e4m3's largest finite value: a row's largest magnitude is mapped to it.
FP8_MAX = float(torch.finfo(FP8).max)
#: Smallest compute capability with fp8 tensor cores (Ada Lovelace).
MIN_CAPABILITY = (8, 9)
#: Widths ``_scaled_mm`` takes for the inner and output dimensions.
MULTIPLE = 16
#: Hopper's fast fp8 accumulation (ignored where there is none).
FAST_ACCUM = True
#: Floor of a scale, so that an all-zero row quantizes to zeros instead of dividing by zero.
_TINY = 1e-12

_OUTPUT: dict[tuple[str, int | None, torch.dtype], torch.dtype] = {}


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, k) tensor → its e4m3 values and float32 (rows, 1) scales, each row's largest
    magnitude mapped to 448: ``values.float() * scales`` approximates ``t``."""
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=_TINY) / FP8_MAX
    values = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return values, scale


def output_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``_scaled_mm`` writes with row-wise scales on ``device`` for a model computing in
    ``dtype``: ``dtype`` itself where the kernel takes it, else bf16 (cast afterwards)."""
    device = torch.device(device)
    key = (device.type, device.index, dtype)
    if key not in _OUTPUT:
        a = torch.zeros(MULTIPLE, MULTIPLE, device=device).to(FP8)
        ones = torch.ones(MULTIPLE, 1, device=device)
        try:
            torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=dtype, use_fast_accum=FAST_ACCUM)
            _OUTPUT[key] = dtype
        except (RuntimeError, ValueError):  # "Only bf16 high precision output types are supported ..."
            _OUTPUT[key] = torch.bfloat16
    return _OUTPUT[key]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``F.linear(x, weight · weight_scale, bias)`` with ``x`` quantized per row and the product in fp8.

    ``weight`` is (out, in) e4m3, ``weight_scale`` float32 (1, out); the result has ``x``'s dtype.
    """
    lead, width = x.shape[:-1], x.shape[-1]
    values, scale = quantize_rows(x.reshape(-1, width))
    out = torch._scaled_mm(values, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=out_dtype,
                           use_fast_accum=FAST_ACCUM)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*lead, out.shape[-1])


# --- the layers -------------------------------------------------------------------------------------


class Fp8Linear(torch.nn.Linear):
    """An ``nn.Linear`` computing in fp8 (made by :func:`convert`, never built directly).

    Buffers ``fp8_weight`` (out, in, e4m3) and ``fp8_scale`` (1, out, float32) are what it computes
    with; ``weight`` is the full-precision ``Parameter`` kept in host memory, not a parameter of
    the module any more (``.to()`` and ``parameters()`` leave it alone), written by LoRA merges.
    """

    fp8_output: torch.dtype

    @property
    def weight(self) -> torch.nn.Parameter:  # type: ignore[override]
        return self.__dict__["full_weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.fp8_weight, self.fp8_scale, self.bias, self.fp8_output)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8 matmul"


class Fp8StoredLinear(StoredLinear):
    """A ``StoredLinear`` of e4m3 bytes multiplying them directly in fp8 (made by :func:`convert`).

    ``fp8_scale`` (1, out, float32) repeats the file's per-tensor scale; LoRA updates held by the
    layer are added to the output in the compute dtype, as :class:`StoredLinear` does.
    """

    fp8_output: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_linear(x, self.packed.view(FP8), self.fp8_scale, self.bias, self.fp8_output)
        for up, down, factor in self.low_rank:
            out = out + F.linear(F.linear(x, down.to(x.device, x.dtype)), up.to(x.device, x.dtype)) * factor
        if self.dense_delta is not None:
            out = out + F.linear(x, self.dense_delta.to(x.device, x.dtype))
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8 matmul"


# --- converting a model and back -----------------------------------------------------------------


def _fits(module: torch.nn.Module) -> bool:
    return module.in_features % MULTIPLE == 0 and module.out_features % MULTIPLE == 0


def convertible(module: torch.nn.Module) -> bool:
    """A plain ``nn.Linear`` or an e4m3 ``StoredLinear`` whose widths ``_scaled_mm`` takes."""
    if type(module) is torch.nn.Linear:
        return _fits(module)
    return type(module) is StoredLinear and module.kind == "float8_e4m3fn" and _fits(module)


def convert(root: torch.nn.Module, *, device: torch.device, dtype: torch.dtype) -> int:
    """Switch every convertible layer of ``root`` to fp8 matmuls; returns how many.

    ``device`` is where the model computes (quantization runs there); each fp8 copy rests where
    the weight rested (the device, or host memory in ``--vram low``), and the full-precision
    weights go to host memory.
    """
    out_dtype = output_dtype(device, dtype)
    layers = [m for m in root.modules() if convertible(m)]
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, StoredLinear):
                _convert_stored(layer, out_dtype)
            else:
                _convert_linear(layer, torch.device(device), out_dtype)
    return len(layers)


def _convert_linear(layer: torch.nn.Linear, device: torch.device, out_dtype: torch.dtype) -> None:
    weight = layer.weight
    rest = weight.device
    values, scale = quantize_rows(weight.detach().to(device))
    layer.__dict__["_fp8_order"] = list(layer._parameters)
    del layer._parameters["weight"]
    layer.__class__ = Fp8Linear
    layer.register_buffer("fp8_weight", values.to(rest), persistent=False)
    layer.register_buffer("fp8_scale", scale.reshape(1, -1).to(rest), persistent=False)
    layer.fp8_output = out_dtype
    weight.data = weight.data.to("cpu")
    layer.__dict__["full_weight"] = weight


def _convert_stored(layer: StoredLinear, out_dtype: torch.dtype) -> None:
    scale = 1.0 if layer.scale is None else float(layer.scale)
    layer.__class__ = Fp8StoredLinear
    layer.register_buffer("fp8_scale", torch.full((1, layer.out_features), scale, dtype=torch.float32,
                                                  device=layer.packed.device), persistent=False)
    layer.fp8_output = out_dtype


def fp8_layers(root: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The layers :func:`convert` switched (both kinds)."""
    return (m for m in root.modules() if isinstance(m, (Fp8Linear, Fp8StoredLinear)))


def refresh(root: torch.nn.Module, *, device: torch.device) -> int:
    """Quantize the converted layers' host weights again (after a LoRA merge or restore), into the
    same buffers; returns how many. Layers on checkpoint fp8 bytes need nothing."""
    count = 0
    with torch.no_grad():
        for layer in fp8_layers(root):
            if isinstance(layer, Fp8Linear):
                values, scale = quantize_rows(layer.weight.detach().to(device))
                layer.fp8_weight.copy_(values)
                layer.fp8_scale.copy_(scale.reshape(1, -1))
                count += 1
    return count


def restore(root: torch.nn.Module) -> None:
    """Every converted layer back to what it was: the same class, the same ``weight`` object with
    the same values, where the layer's fp8 copy rested."""
    for layer in list(fp8_layers(root)):
        if isinstance(layer, Fp8Linear):
            weight = layer.__dict__.pop("full_weight")
            order = layer.__dict__.pop("_fp8_order")
            rest = layer.fp8_weight.device
            del layer.fp8_weight, layer.fp8_scale, layer.fp8_output
            layer.__class__ = torch.nn.Linear
            with torch.no_grad():
                weight.data = weight.data.to(rest)
            params = {**layer._parameters, "weight": weight}
            layer._parameters.clear()
            layer._parameters.update((name, params[name]) for name in order)
        else:
            del layer.fp8_scale, layer.fp8_output
            layer.__class__ = StoredLinear


def capability_problem(device: torch.device) -> str | None:
    """Why fp8 matmuls cannot run on ``device`` (None when they can)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return f"a PyTorch with torch._scaled_mm (this is {torch.__version__})"
    if device.type == "cpu":
        return None  # emulated: correct, slow; allowed so that the code can be checked without a GPU
    if device.type != "cuda":
        return (f"a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
                f"(this model runs on {device})")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return (f"a GPU with fp8 tensor cores, compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
                f"(Ada, Hopper, Blackwell); {device} has {major}.{minor}")
    return None


__all__ = ["Fp8Linear", "Fp8StoredLinear", "capability_problem", "convert", "convertible", "fp8_layers", "fp8_linear",
           "output_dtype", "quantize_rows", "refresh", "restore"]
