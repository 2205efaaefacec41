"""int8 base weights for ``--8bit``: which backend, and lpt's weight-only int8 layer for CPUs.

Two backends freeze the block projections in int8 (``--int8-backend``):

- ``bitsandbytes``: LLM.int8 (``bnb.nn.Linear8bitLt``, vector-wise quantization with the outlier threshold
  ``--int8-threshold``) — the paper's route, built for CUDA; on CPU its training path is far slower than 16 bits.
- ``torch``: weight-only int8 (:class:`Int8Linear`): one absmax scale per output row, ``W ≈ Wq · scale[:, None]``,
  activations stay in the model's dtype. The forward pass is PyTorch's own int8 weight-only matmul
  (``torch.ops.aten._weight_int8pack_mm``, the CPU kernel torchao and gpt-fast use) for 16-bit activations; the
  input gradient LoRA training needs (the weight itself never gets one) is ``dx = (dy · scale) @ Wq``, formed from
  row chunks of ``Wq`` de-quantized to float32 one at a time (:func:`input_grad`), so no full-size copy of the
  weight ever exists.

``auto`` (the default) is ``torch`` on CPU and ``bitsandbytes`` on CUDA. bitsandbytes is imported only when its
backend is used.

Everything int8 lives here: the backends, the weight-only layer and its math, any int8 base as a dense weight
(:func:`dense_weight`, :func:`weight_parts`), quantizing float layers (:func:`quantize_8bit`,
:func:`quantize_projections`), and quantizing while a checkpoint is read (:func:`bitsandbytes_config`,
:func:`from_safetensors`; ``lpt.models.load`` decides when and reads the files). The LoRA layer around an int8 base
is ``lpt.lora``'s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lpt.arch import PROJECTIONS, Arch, describe, get_module, set_module
from lpt.config import INT8_THRESHOLD
from lpt.errors import LptError

BACKENDS = ("auto", "bitsandbytes", "torch")
CHUNK_ELEMS = 1 << 20  # elements of the weight de-quantized at a time (4 MiB of float32)


def resolve_backend(name: str | None, device: str | torch.device = "cpu") -> str:
    """``--int8-backend`` made concrete: ``auto`` -> ``bitsandbytes`` on CUDA, ``torch`` elsewhere."""
    name = name or "auto"
    if name not in BACKENDS:
        raise LptError(f"unknown --int8-backend '{name}' (use {', '.join(BACKENDS)})")
    if name != "auto":
        return name
    if str(device) == "auto":  # --device auto: cuda when present
        return "bitsandbytes" if torch.cuda.is_available() else "torch"
    return "bitsandbytes" if torch.device(device).type == "cuda" else "torch"


def backend_of(layer: nn.Module) -> str | None:
    """The int8 backend of a (base) layer, or None for a full-precision one."""
    if isinstance(layer, Int8Linear):
        return "torch"
    if type(layer).__name__ == "Linear8bitLt":
        return "bitsandbytes"
    return None


def is_int8(layer: nn.Module) -> bool:
    """Whether ``layer`` is an int8 base of either backend (:func:`backend_of`)."""
    return backend_of(layer) is not None


def import_without_bitsandbytes(module: str):
    """``importlib.import_module(module)`` keeping bitsandbytes unloaded when it is not loaded yet. peft (also
    imported by ``transformers.optimization``) tries ``import bitsandbytes`` at import time for helpers lpt does not
    use; that costs seconds of start-up and CUDA probing on a CPU run of the torch backend. bitsandbytes still
    imports normally afterwards (peft checks for it again where it dispatches to it)."""
    import importlib
    import sys

    if module in sys.modules or "bitsandbytes" in sys.modules:
        return importlib.import_module(module)
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # `import bitsandbytes` fails fast
    try:
        return importlib.import_module(module)
    finally:
        if sys.modules.get("bitsandbytes", False) is None:
            del sys.modules["bitsandbytes"]


# ---------------------------------------------------------------------------------------------- math
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(Wq int8 [out, in], scale float32 [out])`` with ``scale = absmax / 127``, so
    ``Wq · scale[:, None]`` is within half a step (``scale / 2``) of ``w`` everywhere. Row chunks keep the float32
    temporaries small."""
    out_f, in_f = w.shape
    q = torch.empty(out_f, in_f, dtype=torch.int8, device=w.device)
    scale = torch.empty(out_f, dtype=torch.float32, device=w.device)
    rows = max(1, CHUNK_ELEMS // max(1, in_f))
    for i in range(0, out_f, rows):
        c = w[i:i + rows].float()
        s = c.abs().amax(1).clamp_min(1e-12) / 127.0
        q[i:i + rows] = torch.round(c / s.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        scale[i:i + rows] = s
    return q, scale


def _kernel_ok(x: torch.Tensor, q: torch.Tensor) -> bool:
    # the CPU kernel takes 16-bit activations (its float32 path was 10-35x slower than de-quantized float32 GEMMs
    # on the measuring machine) and needs the input width to be a multiple of 8 (it crashes or is wrong otherwise)
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and q.shape[1] % 8 == 0


def matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (Wq · scale[:, None])ᵀ`` in ``x``'s dtype, ``x`` of shape ``[..., in]``."""
    x2 = x.reshape(-1, q.shape[1])
    if _kernel_ok(x2, q):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale.to(x.dtype))
    else:  # row chunks of the weight de-quantized in the compute dtype (float32 on CPU): output column chunks
        cdt = torch.float32 if x.device.type == "cpu" else x.dtype
        xc = x2.to(cdt)
        y = torch.empty(x2.shape[0], q.shape[0], dtype=cdt, device=x.device)
        rows = max(1, CHUNK_ELEMS // max(1, q.shape[1]))
        for i in range(0, q.shape[0], rows):
            w = q[i:i + rows].to(cdt).mul_(scale[i:i + rows].to(cdt).unsqueeze(1))
            y[:, i:i + rows] = xc @ w.t()
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], q.shape[0])


def input_grad(dy: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``dy @ (Wq · scale[:, None])`` in ``dy``'s dtype: the gradient w.r.t. the input of :func:`matmul`.

    Accumulated in float32 over row chunks of ``Wq`` (each de-quantized on its own): the chunks are row-major
    ``[rows, in]`` blocks, which float32 GEMMs take at full speed, whereas a 16-bit GEMM against a row-major
    ``[out, in]`` weight (what a dense 16-bit layer's backward runs) hit a slow path on the measuring CPU."""
    out_f, in_f = q.shape
    dys = dy.reshape(-1, out_f).float() * scale.float()
    dx = torch.zeros(dys.shape[0], in_f, dtype=torch.float32, device=dy.device)
    rows = max(1, CHUNK_ELEMS // max(1, in_f))
    for i in range(0, out_f, rows):
        dx.addmm_(dys[:, i:i + rows], q[i:i + rows].float())
    return dx.to(dy.dtype).reshape(*dy.shape[:-1], in_f)


class _Int8MatMul(torch.autograd.Function):
    """:func:`matmul` with the input gradient of :func:`input_grad` (the frozen int8 weight gets none)."""

    @staticmethod
    def forward(ctx, x, q, scale):
        ctx.save_for_backward(q, scale)
        return matmul(x, q, scale)

    @staticmethod
    def backward(ctx, dy):
        q, scale = ctx.saved_tensors
        return (input_grad(dy, q, scale) if ctx.needs_input_grad[0] else None), None, None


# ---------------------------------------------------------------------------------------------- the layer
class Int8Linear(nn.Module):
    """A frozen linear layer with weight-only int8 weights (``weight`` int8 ``[out, in]``, ``scale`` float32
    ``[out]``) and an optional bias in ``dense_dtype``; gradients flow to the input only.

    ``dense_dtype`` is the dtype it was quantized from: what de-quantizing and merging give back by default.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dense_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.dense_dtype = in_features, out_features, dense_dtype
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dense_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    dense_dtype=w.dtype)
        layer.set_weight(w)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize the dense weight ``w`` ``[out, in]`` into this layer (on ``w``'s device)."""
        q, scale = quantize_rows(w)
        self.set_codes(q, scale)

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = scale.float()
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8MatMul.apply(x, self.weight, self.scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def sliced(self, index: torch.Tensor, dim: int) -> "Int8Linear":
        """A new layer keeping rows (``dim=0``, with their scales and bias) or columns (``dim=1``) ``index``. The
        int8 codes are cut as they are (no second rounding), so the kept weights de-quantize to exactly what they
        were."""
        index = index.to(self.weight.device)
        q = torch.index_select(self.weight.detach(), dim, index).contiguous()
        scale = torch.index_select(self.scale, 0, index) if dim == 0 else self.scale.clone()
        out = Int8Linear(q.shape[1], q.shape[0], bias=self.bias is not None, device="meta",
                         dense_dtype=self.dense_dtype)
        out.set_codes(q, scale)
        if self.bias is not None:
            b = self.bias.detach()
            out.bias = nn.Parameter(torch.index_select(b, 0, index).contiguous() if dim == 0 else b.clone(),
                                    requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 weight-only, dense_dtype={str(self.dense_dtype).replace('torch.', '')}")


# ---------------------------------------------------------------------------------------------- any int8 base
def weight_parts(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, row_scale)``: the stored weight and, for int8 bases, the per-row scale that de-quantizes it
    (``W.float() * row_scale[:, None]``); ``row_scale`` is None for full-precision bases."""
    w = base.weight
    if isinstance(base, Int8Linear):
        return w.detach(), base.scale.float()
    if is_int8(base):
        cb = getattr(w, "CB", None)
        scb = getattr(w, "SCB", None)
        if cb is None or scb is None:
            cb, scb = w.data, base.state.SCB
        return cb, scb.float() / 127.0
    return w.detach(), None


def dense_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base weight as a dense tensor ``[out, in]`` (int8 weights de-quantized on the fly)."""
    w, scale = weight_parts(base)
    if scale is not None:
        return (w.to(torch.float32) * scale.unsqueeze(1)).to(dtype)
    return w.to(dtype)


def quantize_8bit(linear: nn.Linear, threshold: float = INT8_THRESHOLD, backend: str = "bitsandbytes") -> nn.Module:
    """An int8 copy of ``linear``: bitsandbytes LLM.int8 (vector-wise quantization), or with ``backend="torch"``
    lpt's weight-only :class:`Int8Linear` (per-row scales; ``threshold`` does not apply).

    ``threshold``: input features whose magnitude reaches it are multiplied in 16 bits (LLM.int8's mixed-precision
    decomposition); 0 quantizes every input. It changes only the forward pass: the stored codes and scales (CB, SCB)
    always hold the whole weight, so ``dense_weight`` and merging are the same for every threshold.
    """
    if backend == "torch":
        return Int8Linear.from_linear(linear)
    if backend != "bitsandbytes":
        raise LptError(f"unknown int8 backend '{backend}' (use bitsandbytes or torch)")
    from lpt import quiet

    bnb = quiet.import_bitsandbytes()

    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=float(threshold), device="meta")
    q.weight = bnb.nn.Int8Params(linear.weight.data.detach().to(torch.float16).cpu(), requires_grad=False,
                                 has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    return q.to(linear.weight.device)


def projection_paths(arch: Arch) -> list[str]:
    """The module path of every block projection of ``arch``, layer by layer (what ``--8bit`` quantizes)."""
    return [arch.module_path(i, p) for i in range(arch.num_layers) for p in PROJECTIONS]


def quantize_projections(model: nn.Module, arch: Arch, threshold: float = INT8_THRESHOLD,
                         backend: str = "auto") -> None:
    """Freeze every block projection of ``model`` that is still a float ``nn.Linear`` in int8, in place
    (:func:`quantize_8bit`, ``backend`` resolved per layer's device by :func:`resolve_backend`; the same weights as
    quantizing while the checkpoint is read, :func:`from_safetensors` / :func:`bitsandbytes_config`)."""
    for p in projection_paths(arch):
        base = get_module(model, p)
        if isinstance(base, nn.Linear) and not is_int8(base):
            set_module(model, p, quantize_8bit(base, threshold, resolve_backend(backend, base.weight.device)))


# ---------------------------------------------------------------------------------------------- while loading
def bitsandbytes_config(config: Any, threshold: float = INT8_THRESHOLD, trust_remote_code: bool = False):
    """The ``BitsAndBytesConfig`` that has transformers quantize the block projections of a ``config`` model while
    it reads the checkpoint (LLM.int8 outlier threshold ``threshold``; the head stays in 16 bits), or None where
    this does not apply: a model with linear layers other than the block projections and the head (their names
    could not be excluded from quantization safely). bitsandbytes is imported here, its import-time warnings
    hidden (transformers imports it next)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lpt import quiet

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    wanted = set(projection_paths(describe(config)))
    others = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n not in wanted]
    if others != ["lm_head"]:
        return None
    quiet.import_bitsandbytes()
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(threshold),
                              llm_int8_skip_modules=["lm_head"])


def from_safetensors(config: Any, handles: list, *, dtype: torch.dtype, device: str,
                     trust_remote_code: bool = False) -> nn.Module | None:
    """A ``config`` model read from open safetensors files (``handles``) with its block projections quantized as
    they arrive (``--int8-backend torch`` while loading): the skeleton is built without memory (accelerate's
    ``init_empty_weights``), its block projections replaced by empty :class:`Int8Linear` layers, and the tensors
    read one at a time: a projection weight is cast to ``dtype`` and quantized, everything else is placed as is.
    The largest full-precision tensor alive is one weight matrix, so the peak is the int8 model plus one tensor.
    The weights are bit-identical to :func:`quantize_projections` of the same checkpoint loaded in ``dtype``.

    Returns None (the caller loads normally and quantizes afterwards) for tensor names the model does not have,
    tensors the model needs that the files lack (transformers' loader maps, initialises or reports them), or fused
    projections (``lpt.fused`` splits them after loading)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    arch = describe(config)
    if arch.family.fused:
        return None  # fused layers (lpt.fused): loaded whole, split, then quantized
    with init_empty_weights():
        m = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    wanted = set(projection_paths(arch))
    for p in wanted:
        lin = get_module(m, p)
        set_module(m, p, Int8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta",
                                    dense_dtype=dtype))
    names = {n for n, _ in m.named_parameters(remove_duplicate=False)} | {n for n, _ in m.named_buffers()}
    if any(k not in names for h in handles for k in h.keys()):
        return None  # renamed or extra tensors: let transformers' loader map them
    for h in handles:
        for key in h.keys():
            t = h.get_tensor(key)
            path, _, leaf = key.rpartition(".")
            if path in wanted and leaf == "weight":
                get_module(m, path).set_weight(t.to(device=device, dtype=dtype))
            else:
                set_module_tensor_to_device(m, key, device, value=t, dtype=dtype if t.is_floating_point() else None)
            del t
    if getattr(m.config, "tie_word_embeddings", False):
        m.tie_weights()
    if any(t.device.type == "meta" for t in (*m.parameters(), *m.buffers())):
        return None  # tensors missing from the checkpoint: transformers' loader initialises or reports them
    return m.to(device)
