"""Memory arithmetic of pruning 7B–70B models: what one process needs, for docs/scaling.md.

    python -c "from lpt.benchmarking.scaling import memory_table; print(memory_table())"
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass
class Shape:
    """The numbers of a Llama-style model that decide its memory."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linear(self) -> int:
        """Weights of the seven projections of one block."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return 2 * h * h + 2 * h * kv + 3 * h * i

    def block_rows(self) -> int:
        """Output rows of the seven projections of one block (one int8 scale each)."""
        return 2 * self.hidden + 2 * self.kv_dim + 3 * self.intermediate

    def params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (self.block_linear() + 2 * self.hidden) + emb + self.hidden

    def lora_params(self, r: int) -> int:
        """LoRA A [r, in] and B [out, r] on all seven projections of every block."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return self.layers * r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))

    def activation_bytes_per_token(self, r: int, model_bytes: int = 2) -> int:
        """Bytes autograd keeps per token for the backward of ``lpt prune`` (all blocks, LoRA in float32, LoRA
        dropout 0, no gradient checkpointing, fused attention), as measured with saved-tensor hooks.

        Per block with 16-bit weights (int8 bases keep the same): the two RMSNorm inputs upcast to float32
        (8h, + 8 for their rsqrt), the float32 copy of each projection's input that LoRA A sees (4·(6h + i)), q and
        k after the rotary embedding, v and the attention output (2·(2h + 2kv)), the attention log-sum-exp (4·heads),
        gate, up and act(gate) (2·3i), and the seven rank-r LoRA A outputs (4·7r). With float32 weights the casts
        are no-ops and copies coincide: 4·(6h + 2kv + 4i + 7r + heads) + 8.
        """
        h, kv, i, n = self.hidden, self.kv_dim, self.intermediate, self.heads
        if model_bytes == 4:
            block = 4 * (6 * h + 2 * kv + 4 * i + 7 * r + n) + 8
        else:
            block = 8 * h + 8 + 4 * (6 * h + i) + model_bytes * (2 * h + 2 * kv + 3 * i) + 4 * n + 28 * r
        return self.layers * block


# Published configurations (LLaMA-1 7B/13B/30B/65B, Llama-2-70B).
SHAPES = {
    "7B": Shape("LLaMA-7B", 32, 4096, 11008, 32, 32, 32000),
    "13B": Shape("LLaMA-13B", 40, 5120, 13824, 40, 40, 32000),
    "30B": Shape("LLaMA-30B", 60, 6656, 17920, 52, 52, 32000),
    "65B": Shape("LLaMA-65B", 80, 8192, 22016, 64, 64, 32000),
    "70B": Shape("Llama-2-70B", 80, 8192, 28672, 64, 8, 32000),
}


def memory_estimate(shape: Shape, *, load_8bit: bool, r: int = 8, micro_batch: int = 4, seq_len: int = 256
                    ) -> dict[str, int]:
    """Bytes one process needs for ``lpt prune`` of ``shape`` (bf16 weights, or int8 projections with ``load_8bit``).

    weights: projections at 2 bytes, or 1 byte plus a float32 scale per row with ``load_8bit``; embeddings, head
    and norms at 2. lora: A and B in float32 (4) + gradients (4) + AdamW's two moments (8) = 16 bytes per LoRA
    parameter. criterion: Eq. 10 forms one projection's dense ``G`` and ``I`` at a time (float32, the largest
    projection, ~3 such buffers alive). activations: ``micro_batch × seq_len`` tokens of
    :meth:`Shape.activation_bytes_per_token` plus ~12 bytes per vocabulary entry per token for the logits (bf16
    logits, float32 log-softmax and its gradient). The global batch (128 in the paper) is reached by accumulating
    micro-batches and does not change the memory; data parallelism divides the micro-batches between processes.
    """
    lin = shape.layers * shape.block_linear()
    rest = shape.params() - lin
    weights = (lin + 4 * shape.layers * shape.block_rows() if load_8bit else 2 * lin) + 2 * rest
    lora = 16 * shape.lora_params(r)
    criterion = 3 * 4 * shape.hidden * shape.intermediate
    tokens = micro_batch * seq_len
    activations = tokens * (shape.activation_bytes_per_token(r) + 12 * shape.vocab)
    return {"params": shape.params(), "weights": weights, "lora": lora, "criterion": criterion,
            "activations": activations, "total": weights + lora + criterion + activations}


def memory_table(r: int = 8, seq_len: int = 256, gpu_gib: float = 80.0) -> str:
    """The Markdown table of docs/scaling.md: per model and weight format, the fixed memory, the activations of one
    ``seq_len`` sample, the largest micro-batch one ``gpu_gib`` GPU takes (keeping 5% free), and the layout."""
    gib, usable = 2**30, 0.95 * gpu_gib * 2**30
    rows = ["| model | params | format | weights | LoRA + grads + AdamW | criterion | activations per sample "
            f"| largest micro-batch on one {gpu_gib:.0f} GiB GPU | layout |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key, shape in SHAPES.items():
        for q8 in (False, True):
            m = memory_estimate(shape, load_8bit=q8, r=r, micro_batch=1, seq_len=seq_len)
            fixed = m["weights"] + m["lora"] + m["criterion"]
            mb = int((usable - fixed) // m["activations"]) if usable > fixed else 0
            if mb >= 1:
                layout = "1 GPU (data parallel over more)"
            else:
                n = 2
                while fixed + m["activations"] > n * usable * 0.9:  # 10% lost to whole-layer placement
                    n += 1
                layout = f"`--device-map auto` over {n}+ GPUs"
            cells = [key, f"{m['params'] / 1e9:.2f} B", "int8" if q8 else "bf16", f"{m['weights'] / gib:.1f} GiB",
                     f"{m['lora'] / gib:.2f} GiB", f"{m['criterion'] / gib:.2f} GiB",
                     f"{m['activations'] / gib:.2f} GiB", str(mb) if mb else "—", layout]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
