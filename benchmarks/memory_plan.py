"""The memory planner's table: Llama-3-8B / 70B on TPU v5p slices and 8x H100 (no device needed).

    python -m benchmarks.memory_plan             # prints the table
    python -m benchmarks.run_all --only memory_plan   # writes memory_plan.json and the RESULTS.md table

Setup: bf16 base, fp32 LoRA r = 16 on all seven linear modules, AdamW, K = 4 unrolled inner steps
with remat of the inner scan, ``remat_layers=True``, sequence 2048 (see docs/scaling.md).
"""

from __future__ import annotations

from benchmarks import harness
from flexora_jax.config import LoraConfig, ModelConfig
from flexora_jax.memory import memory_table, plan_memory

LLAMA3 = dict(
    vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, remat_layers=True, rope_scaling=None
)
MODELS = {
    "Llama-3-8B": ModelConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        **LLAMA3,
    ),
    "Llama-3-70B": ModelConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        **LLAMA3,
    ),
}
V5P, H100 = 95, 80
ROWS = [  # model, hardware, mesh, HBM GB, batch
    ("Llama-3-8B", "TPU v5p-8 (4 chips)", {"fsdp": 4}, V5P, 16),
    ("Llama-3-8B", "TPU v5p-8 (4 chips)", {"fsdp": 4}, V5P, 8),
    ("Llama-3-8B", "TPU v5p-16 (8 chips)", {"fsdp": 8}, V5P, 16),
    ("Llama-3-8B", "8x H100 80GB", {"fsdp": 8}, H100, 16),
    ("Llama-3-70B", "TPU v5p-16 (8 chips)", {"fsdp": 8}, V5P, 16),
    ("Llama-3-70B", "TPU v5p-32 (16 chips)", {"fsdp": 16}, V5P, 16),
    ("Llama-3-70B", "TPU v5p-64 (32 chips)", {"fsdp": 16, "model": 2}, V5P, 16),
    ("Llama-3-70B", "8x H100 80GB", {"fsdp": 8}, H100, 16),
    ("Llama-3-70B", "8x H100 80GB", {"fsdp": 8}, H100, 8),
]


def table(k: int = 4, seq: int = 2048) -> str:
    lora = LoraConfig(r=16, lora_alpha=32.0, target_modules="all-linear")
    rows = [
        {
            "model": m,
            "slice": hw,
            "mesh": mesh,
            "hbm_gb": hbm,
            "batch": b,
            "seq": seq,
            "k": k,
            "plan": plan_memory(MODELS[m], lora, mesh, k, b, seq, remat=True, dtype="bfloat16"),
        }
        for m, hw, mesh, hbm, b in ROWS
    ]
    return memory_table(rows)


def run(smoke: bool = False, out_dir: str | None = None, command: str | None = None) -> dict:
    """Writes ``memory_plan.json`` (the table as Markdown; ``_smoke`` in smoke mode: the same table)."""
    payload = {"command": command or "python -m benchmarks.memory_plan", "k": 4, "seq": 2048, "table": table()}
    harness.write_result("memory_plan_smoke" if smoke else "memory_plan", payload, out_dir)
    return payload


if __name__ == "__main__":
    print(table())
