"""Architecture descriptions: where the projections of a decoder block live, and its head geometry.

Head count, key/value head count and head size always come from the model config, never from constants.
A family is supported when its blocks follow the Llama layout (q/k/v/o attention, gate/up/down gated MLP); what
differs between families is described by data fields of ``Family`` (biases, query/key norms), never by if-chains
on the family name. Things that pruning does not touch (post-norms, tied embeddings, explicit ``head_dim``,
sliding-window layers, logit soft-capping, embedding / residual multipliers) need no description: they stay as the
family's own code and config handle them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lpt.errors import LptError

ATTN_OUT = ("q_proj", "k_proj", "v_proj")  # fan-out: a head is a block of output rows
ATTN_IN = ("o_proj",)  # fan-in: a head is a block of input columns
MLP_OUT = ("gate_proj", "up_proj")
MLP_IN = ("down_proj",)
PROJECTIONS = ATTN_OUT + ATTN_IN + MLP_OUT + MLP_IN
FAN_OUT = ATTN_OUT + MLP_OUT  # a unit is a block of output rows
FAN_IN = ATTN_IN + MLP_IN  # a unit is a block of input columns
# the config lists of a model sliced with per-layer widths, one entry per block (lpt/modeling/modeling_lpt.py keeps
# its own copy: it is copied next to the weights and must stand alone)
LAYER_FIELDS = ("lpt_layer_num_attention_heads", "lpt_layer_num_key_value_heads", "lpt_layer_intermediate_size")


def has_layer_widths(config: Any) -> bool:
    """Whether a model config (an object, or the dict of a ``config.json``) lists per-layer widths."""
    get = config.get if isinstance(config, dict) else (lambda f: getattr(config, f, None))
    return any(get(f) for f in LAYER_FIELDS)


@dataclass(frozen=True)
class Fused:
    """One linear layer of a family that computes several of lpt's projections, its output rows stacked in ``parts``
    order (Phi-3's ``self_attn.qkv_proj``: q, k, v; ``mlp.gate_up_proj``: gate, up). ``lpt.fused`` splits it into
    one child linear per part while lpt works on the model and fuses it back before a model directory is written."""

    parent: str  # "attn" or "mlp": the Family field naming the module that holds it
    name: str  # its attribute there, e.g. "qkv_proj"
    parts: tuple[str, ...]  # the projections it computes, e.g. ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Family:
    """Where things are in one decoder family (module paths relative to the causal-LM model)."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    # projection name -> attribute inside attn / mlp
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    # biases: True / False, or None = read the config (``attention_bias`` for q/k/v, ``mlp_bias`` for the MLP)
    qkv_bias: bool | None = None
    o_bias: bool | None = None  # None = same as the q/k/v bias (Llama's attention_bias covers o_proj too)
    mlp_bias: bool | None = None
    # norms applied to the query / key projections before attention:
    #   None   - none;
    #   "head" - over head_dim, one weight shared by every head (Qwen3, Gemma 3): nothing to slice;
    #   "full" - over the whole projection width, num_heads * head_dim (OLMo 2): sliced with the heads.
    qk_norm: str | None = None
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    # the transformers causal-LM class (lpt.modeling subclasses it for per-layer widths)
    hf_class: str = "LlamaForCausalLM"
    # what hidden-size pruning (--hidden-ratio) must know:
    #   block_norms  - RMS norms over the hidden size in every block (Gemma 2 / 3: pre- and post-feedforward too);
    #   norm_offset  - their scale is (offset + weight): Gemma's (1 + w);
    #   embed_scale  - embeddings multiplied by sqrt(hidden_size) (Gemma), which a smaller hidden size changes.
    block_norms: int = 2
    norm_offset: float = 0.0
    embed_scale: bool = False
    # transformers' config of the family refuses a hidden size that is not a multiple of num_attention_heads (its
    # validate_architecture), even with an explicit head_dim: uniform prunes keep that true
    heads_divide_hidden: bool = False
    # fused linear layers (lpt.fused): q / k / v / gate / up above then name their children ("qkv_proj.q_proj")
    fused: tuple[Fused, ...] = ()
    # whether lpt.modeling builds the family with per-layer widths (False: --layout per-layer is refused)
    per_layer_widths: bool = True
    # runtimes size the family's attention from hidden_size / num_attention_heads instead of head_dim: llama.cpp's
    # graph (q and o are hidden_size wide, so a GGUF that keeps fewer query heads does not load) and transformers'
    # check of longrope factors (a config that has them no longer loads with fewer query heads)
    attn_width_is_hidden: bool = False

    def module_path(self, layer: int, proj: str) -> str:
        parent = self.attn if proj in ATTN_OUT + ATTN_IN else self.mlp
        return f"{self.layers}.{layer}.{parent}.{getattr(self, proj.split('_')[0])}"


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama",), heads_divide_hidden=True),
    "mistral": Family("mistral", ("mistral",), qkv_bias=False, mlp_bias=False, hf_class="MistralForCausalLM"),
    "qwen2": Family("qwen2", ("qwen2",), qkv_bias=True, o_bias=False, mlp_bias=False, hf_class="Qwen2ForCausalLM"),
    "qwen3": Family("qwen3", ("qwen3",), mlp_bias=False, qk_norm="head", hf_class="Qwen3ForCausalLM"),
    "gemma": Family("gemma", ("gemma",), mlp_bias=False, hf_class="GemmaForCausalLM", norm_offset=1.0,
                    embed_scale=True),
    "gemma2": Family("gemma2", ("gemma2",), mlp_bias=False, hf_class="Gemma2ForCausalLM", block_norms=4,
                     norm_offset=1.0, embed_scale=True, heads_divide_hidden=True),
    "gemma3": Family("gemma3", ("gemma3_text",), mlp_bias=False, qk_norm="head", hf_class="Gemma3ForCausalLM",
                     block_norms=4, norm_offset=1.0, embed_scale=True, heads_divide_hidden=True),
    "granite": Family("granite", ("granite",), hf_class="GraniteForCausalLM"),
    "olmo2": Family("olmo2", ("olmo2",), mlp_bias=False, qk_norm="full", hf_class="Olmo2ForCausalLM"),
    "phi3": Family("phi3", ("phi3",), q="qkv_proj.q_proj", k="qkv_proj.k_proj", v="qkv_proj.v_proj",
                   gate="gate_up_proj.gate_proj", up="gate_up_proj.up_proj", qkv_bias=False, o_bias=False,
                   mlp_bias=False, hf_class="Phi3ForCausalLM",
                   fused=(Fused("attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                          Fused("mlp", "gate_up_proj", ("gate_proj", "up_proj"))),
                   per_layer_widths=False, attn_width_is_hidden=True),
}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


@dataclass(frozen=True)
class Arch:
    """The geometry of one model, read from its config."""

    family: Family
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    # biases of the projections (resolved from the family and the config)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # per-layer widths when the model was already sliced with a per-layer layout (None = uniform)
    layer_heads: tuple[int, ...] | None = None
    layer_kv_heads: tuple[int, ...] | None = None
    layer_intermediate: tuple[int, ...] | None = None
    # why every query head must stay (a config that would not load with fewer), or "" when heads may be pruned
    heads_locked: str = ""

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def per_layer(self) -> bool:
        """Whether the model was already sliced with per-layer widths (its config lists every layer's widths)."""
        return bool(self.layer_heads or self.layer_kv_heads or self.layer_intermediate)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def heads(self, layer: int) -> int:
        return self.layer_heads[layer] if self.layer_heads else self.num_heads

    def kv_heads(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def intermediate(self, layer: int) -> int:
        return self.layer_intermediate[layer] if self.layer_intermediate else self.intermediate_size

    def block_linear_params(self, layer: int) -> int:
        """Parameters of the seven linear projections of one block (weights and biases), plus the query / key norm
        weights when they span the whole projection width (they shrink with the heads)."""
        return self.block_params_for(self.heads(layer), self.kv_heads(layer), self.intermediate(layer))

    def block_params_for(self, heads: int, kv_heads: int, channels: int, hidden: int | None = None) -> int:
        """What ``block_linear_params`` counts, for a block of the given widths (and hidden size: the model's when
        None)."""
        hd, d = self.head_dim, self.hidden_size if hidden is None else hidden
        weights = 2 * heads * hd * d + 2 * kv_heads * hd * d + 3 * channels * d
        biases = ((heads + 2 * kv_heads) * hd if self.qkv_bias else 0) + (d if self.o_bias else 0)
        biases += (2 * channels + d) if self.mlp_bias else 0
        norms = (heads + kv_heads) * hd if self.family.qk_norm == "full" else 0
        return weights + biases + norms

    def block_other_params(self, hidden: int | None = None) -> int:
        """Parameters of one block outside its projections: the norms over the hidden size, and query / key norms
        over ``head_dim`` (which no pruning of heads changes)."""
        d = self.hidden_size if hidden is None else hidden
        return self.family.block_norms * d + (2 * self.head_dim if self.family.qk_norm == "head" else 0)

    def embedding_params(self, hidden: int | None = None) -> int:
        """The token embedding, the output layer when it is not tied to it, and the final norm."""
        d = self.hidden_size if hidden is None else hidden
        return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d

    def model_params_for(self, layers: int, heads: int, kv_heads: int, channels: int, hidden: int | None = None
                         ) -> int:
        """Parameters of the whole model with ``layers`` blocks of uniform widths and the given hidden size."""
        return (self.embedding_params(hidden) +
                layers * (self.block_params_for(heads, kv_heads, channels, hidden) + self.block_other_params(hidden)))

    def model_params(self) -> int:
        """Parameters of the whole model as its config describes it (per-layer widths included)."""
        return self.embedding_params() + sum(self.block_linear_params(i) + self.block_other_params()
                                             for i in range(self.num_layers))

    def head_params(self) -> int:
        """Parameters that go with one query head (q rows, o columns, q bias, full-width q norm)."""
        hd, d = self.head_dim, self.hidden_size
        return 2 * hd * d + (hd if self.qkv_bias else 0) + (hd if self.family.qk_norm == "full" else 0)

    def kv_head_params(self) -> int:
        """Parameters that go with one key/value head alone (k and v rows, biases, full-width k norm)."""
        hd, d = self.head_dim, self.hidden_size
        return 2 * hd * d + (2 * hd if self.qkv_bias else 0) + (hd if self.family.qk_norm == "full" else 0)

    def channel_params(self) -> int:
        """Parameters that go with one MLP channel (gate and up rows, down column, gate / up biases)."""
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    def module_path(self, layer: int, proj: str) -> str:
        return self.family.module_path(layer, proj)

    def check_heads(self, kept: int, fix: str, hidden: int | None = None) -> None:
        """Refuse a model that keeps ``kept`` of the query heads (and a hidden size of ``hidden``) when heads and
        hidden size must stay (``heads_locked``)."""
        if self.heads_locked and kept < self.num_heads:
            raise LptError(f"{self.heads_locked}, so a model keeping {kept} of {self.num_heads} query heads would not "
                           f"load; {fix}")
        if self.heads_locked and hidden is not None and hidden < self.hidden_size:
            raise LptError(f"{self.heads_locked}, so a model with a hidden size of {hidden} instead of "
                           f"{self.hidden_size} would not load; {fix}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.family.name,
            "model_type": self.model_type,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def family_of(model_type: str | None) -> Family:
    """The family describing ``model_type``; the error lists the supported model types."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise LptError(f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}")


def _bias(declared: bool | None, config: Any, field: str) -> bool:
    return bool(getattr(config, field, False)) if declared is None else declared


def default_gqa(arch: Arch, requested: str | None = None) -> tuple[str, str | None]:
    """The grouped-query attention mode to prune with, and a note for the user (or None).

    With a single key/value head (multi-query attention, e.g. Gemma 2B) ``kv-groups`` has one attention unit per
    layer and a layer must keep one, so it could prune no attention at all: unless ``query-heads`` was asked for
    explicitly, the answer is ``query-heads`` (prune query heads inside the one group) with a note saying so. An
    explicit ``kv-groups`` is honoured (MLP-only pruning) with a note. ``requested=None`` means "not given".
    """
    if arch.num_kv_heads == 1 and arch.num_heads > 1:
        if requested is None:
            return "query-heads", ("this model has a single key/value head, so kv-groups could prune no attention: "
                                   "pruning query heads instead (--gqa query-heads)")
        if requested == "kv-groups":
            return "kv-groups", ("this model has a single key/value head: --gqa kv-groups prunes MLP channels only "
                                 "(--gqa query-heads prunes query heads)")
    return requested or "kv-groups", None


def describe(config: Any) -> Arch:
    """Read an ``Arch`` from a transformers config (or anything with the same attributes)."""
    model_type = getattr(config, "model_type", None)
    fam = family_of(model_type)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(config.hidden_size)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if heads % kv:
        raise LptError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")

    def _tuple(name: str):
        v = getattr(config, name, None)
        return tuple(int(x) for x in v) if v else None

    qkv_bias = _bias(fam.qkv_bias, config, "attention_bias")
    return Arch(
        family=fam,
        model_type=model_type,
        num_layers=int(config.num_hidden_layers),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=int(head_dim),
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=qkv_bias if fam.o_bias is None else fam.o_bias,
        mlp_bias=_bias(fam.mlp_bias, config, "mlp_bias"),
        layer_heads=_tuple(LAYER_FIELDS[0]),
        layer_kv_heads=_tuple(LAYER_FIELDS[1]),
        layer_intermediate=_tuple(LAYER_FIELDS[2]),
        heads_locked=_heads_locked(fam, config),
    )


def _heads_locked(fam: Family, config: Any) -> str:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if fam.attn_width_is_hidden and isinstance(rope, dict) and (rope.get("short_factor") or rope.get("long_factor")):
        return (f"this {fam.name} config's longrope factors are checked by transformers against hidden_size / "
                f"num_attention_heads")
    return ""


def get_module(model: Any, path: str):
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part) if not part.isdigit() else mod[int(part)]
    return mod


def set_module(model: Any, path: str, new) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    setattr(parent, name, new)


def hidden_norms(model: Any, arch: Arch) -> list[str]:
    """Module paths of every RMS norm over the hidden size: in each decoder block (its direct children with a
    one-dimensional weight of ``hidden_size`` entries: input / post-attention norms, Gemma's pre- and post-feedforward
    norms, OLMo 2's post norms) and the decoder's final norm. Query / key norms live inside the attention module and
    are not among them."""
    from torch import nn

    out = []
    layers = get_module(model, arch.family.layers)
    for i, layer in enumerate(layers):
        for name, mod in layer.named_children():
            w = getattr(mod, "weight", None)
            if not isinstance(mod, (nn.Linear, nn.Embedding)) and isinstance(w, nn.Parameter) and w.dim() == 1 \
                    and w.shape[0] == arch.hidden_size:
                out.append(f"{arch.family.layers}.{i}.{name}")
    decoder_path = arch.family.layers.rsplit(".", 1)[0]
    final = get_module(model, decoder_path)
    norm = getattr(final, "norm", None)
    if norm is None or getattr(norm, "weight", None) is None:
        raise LptError(f"{arch.name}: the decoder has no final norm 'norm' (the family description is wrong)")
    out.append(f"{decoder_path}.norm")
    return out
