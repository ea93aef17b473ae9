"""GPU measurements the issues ask for, in one script: the bf16 matmul ceiling, full bf16 training
throughput and model-FLOPs utilisation, and the QLoRA footprint's peak memory and tokens/s
against the memory formula.

    python bench/gpu.py                          # on a CUDA machine: a ~1.1B random Llama, about 5 minutes
    python bench/gpu.py --size tiny --device cpu # a dry run of the same code on CPU (seconds)

- **Ceiling**: the best of several ``[8192, 8192] @ [8192, 8192]`` bf16 matmuls, in TFLOP/s. MFU is
  measured against it (and the card's datasheet peak is printed beside it).
- **full bf16**: ``PreferenceModule`` (SPPO loss, cached reference log-probs, the path self-play
  trains on) on a randomly initialised Llama of TinyLlama-1.1B's shape, AdamW, ``pairs`` pairs of
  ``seq`` tokens per step. MFU = 6·N·tokens / time / ceiling (N: parameters without the
  embeddings).
- **qlora**: the same model saved to disk and loaded as the ``qlora`` footprint loads it (4-bit nf4,
  double quantisation, LoRA r=16 on all linear layers, activation checkpointing, paged 8-bit
  AdamW). Peak ``torch.cuda.max_memory_allocated`` against ``estimate_memory``'s training peak
  (weights + gradients + optimizer + activations; the issue's target: within 15%).

No weights are downloaded: the model is built from a config. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from ceiling import matmul_ceiling, sync  # bench/ceiling.py (the script's folder is on sys.path)

SIZES = {  # hidden, layers, intermediate, heads, kv heads (TinyLlama-1.1B's shape for "1b")
    "1b": (2048, 22, 5632, 32, 4),
    "tiny": (128, 2, 256, 4, 2),
}


def synthetic_batch(vocab: int, pairs: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A ``collate_pairs``-shaped batch: half prompt, half response, no padding, cached reference."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2 * pairs, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "chosen_probs_win": torch.full((pairs,), 0.7), "chosen_probs_lose": torch.full((pairs,), 0.3),
             "reference_chosen_logps": torch.full((pairs,), -float(seq)),
             "reference_rejected_logps": torch.full((pairs,), -float(seq))}
    return {k: v.to(device) for k, v in batch.items()}


def train_steps(module, batch: dict, steps: int, device: torch.device, optimizer_name: str) -> float:
    """Seconds per optimizer step, after one warm-up step."""
    from sppo_lightning.optim import make_optimizer

    optimizer = make_optimizer(module.policy.parameters(), optimizer_name, 1e-6, 0.0, 0.0, steps + 1)["optimizer"]
    times = []
    for step in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        loss = module.step(batch)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step:  # the first step allocates optimizer state and warms kernels up
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 peak (H100/H200 SXM: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)

    from transformers import LlamaForCausalLM

    from sppo_lightning.memory import GIB, ModelShape, estimate_memory
    from sppo_lightning.models import LoraSettings
    from sppo_lightning.module import PreferenceModule
    from sppo_lightning.testing import llama_config, make_tiny_tokenizer

    hidden, layers, intermediate, heads, kv = SIZES[args.size]
    tokenizer = make_tiny_tokenizer()
    config = llama_config(tokenizer, vocab_size=32_000, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                          max_position_embeddings=4096)
    shape = ModelShape.from_config(config)
    tokens = 2 * args.pairs * args.seq
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "parameters": shape.params, "pairs": args.pairs, "seq": args.seq}
    n = 8192 if device.type == "cuda" else 512
    result["matmul_ceiling_tflops"] = round(matmul_ceiling([(n, n, n)], device, torch.bfloat16) / 1e12, 1)
    result["datasheet_peak_tflops"] = args.peak_tflops

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(Path(tmp) / "model")
        tokenizer.save_pretrained(Path(tmp) / "model")
        batch = synthetic_batch(config.vocab_size, args.pairs, args.seq, device)

        # full bf16 (all weights train), the FLOP count that MFU is defined on
        module = PreferenceModule(str(Path(tmp) / "model"), loss="sppo", eta=1000.0, reference="cached",
                                  torch_dtype="bfloat16")
        module.configure_model()
        module.to(device)
        seconds = train_steps(module, batch, args.steps, device, "adamw")
        flops = 6 * (shape.params - 2 * shape.vocab * shape.hidden) * tokens
        result["full_bf16"] = {"tokens_per_s": round(tokens / seconds), "seconds_per_step": round(seconds, 4),
                               "mfu_vs_ceiling": round(flops / seconds / 1e12 / result["matmul_ceiling_tflops"], 3),
                               "mfu_vs_datasheet": round(flops / seconds / 1e12 / args.peak_tflops, 3)}
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        # qlora, loaded as the footprint loads it
        module = PreferenceModule(str(Path(tmp) / "model"), loss="sppo", eta=1000.0, reference="cached",
                                  footprint="qlora", lora=LoraSettings(r=16, alpha=32), torch_dtype="bfloat16",
                                  optimizer="paged_adamw_8bit")
        from sppo_lightning.models import add_lora, disable_dropout, enable_checkpointing, load_causal_lm

        policy = load_causal_lm(str(Path(tmp) / "model"), "bfloat16", quantize_4bit=True, device=device)
        disable_dropout(policy)
        policy = add_lora(policy, module.lora)
        enable_checkpointing(policy)
        module.policy = policy.to(device).train()
        seconds = train_steps(module, batch, args.steps, device, "paged_adamw_8bit")
        estimate = estimate_memory(shape, "qlora", pairs_per_device=args.pairs, seq_len=args.seq,
                                   optimizer="paged_adamw_8bit", lora_r=16)
        predicted = (estimate.weights + estimate.gradients + estimate.optimizer + estimate.activations) * GIB
        row = {"tokens_per_s": round(tokens / seconds), "seconds_per_step": round(seconds, 4),
               "formula_training_peak_GiB": round(predicted / GIB, 3)}
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            row["peak_allocated_GiB"] = round(peak / GIB, 3)
            row["formula/measured"] = round(predicted / peak, 3)
        result["qlora"] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
