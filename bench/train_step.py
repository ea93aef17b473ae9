"""Training-step throughput and peak memory: sppo-lightning against TRL, side by side.

    python bench/train_step.py                # 3 repeats, both sides alternating: about 6 minutes on 2 cores

Ours: ``PreferenceModule`` with the SPPO-hard loss and *cached* reference log-probs (what self-play
produces), through a Lightning ``Trainer``. Baseline: TRL's ``DPOTrainer(loss_type=["sppo_hard"])``
with a live reference model, how TRL users and the official SPPO code run it. Same offline Llama
(~35M parameters, 32k vocabulary), same 40 pairs with responses of 20-400 tokens, batch of 4 pairs,
RMSprop at 5e-7 with 10% warmup, gradient clipping at 1.0, one epoch, fp32 on CPU.

Each side runs in its own process so that its peak RSS is its own. Reported: real (non-padding)
tokens per second of training and peak RSS, as ratios ours/TRL with min/median/max over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PAIRS, BATCH = 40, 4


def prepare(out: Path) -> None:
    """The model, the pair data (plain strings for TRL; ours adds cached reference log-probs)."""
    from transformers import LlamaForCausalLM

    from sppo_lightning.data.rows import PreferenceRow
    from sppo_lightning.data.tokenize import collate_pairs, encode_row
    from sppo_lightning.logprobs import model_logprobs
    from sppo_lightning.testing import WORDS, llama_config, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    config = llama_config(tokenizer, vocab_size=32_000, hidden_size=384, intermediate_size=1024,
                          num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                          max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    g = torch.Generator().manual_seed(0)

    def text(n_words: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=g).tolist())

    rows, tokens = [], 0
    for _ in range(PAIRS):
        prompt = text(int(torch.randint(15, 60, (1,), generator=g)))
        chosen, rejected = (text(int(torch.randint(16, 320, (1,), generator=g))) for _ in range(2))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    examples = [encode_row(tokenizer, PreferenceRow([{"role": "user", "content": r["prompt"]}], r["chosen"],
                                                    r["rejected"], {}, {}), 2048, 1024) for r in rows]
    with torch.no_grad():
        for row, ex in zip(rows, examples):
            batch = collate_pairs([ex], tokenizer.pad_token_id)
            ref = model_logprobs(model.eval(), batch).sum.tolist()
            row["reference_chosen_logps"], row["reference_rejected_logps"] = ref
            tokens += 2 * len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"])
    lengths = [len(ex["chosen_ids"]) for ex in examples] + [len(ex["rejected_ids"]) for ex in examples]
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"real_tokens": tokens, "params": sum(p.numel() for p in model.parameters()),
            "response_tokens": [min(lengths), max(lengths)]}
    (out / "info.json").write_text(json.dumps(info))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(out: Path) -> dict:
    import lightning as L

    from sppo_lightning.data import PreferenceDataModule
    from sppo_lightning.module import PreferenceModule

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.rss_before, self.start = rss_mb(), time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    module = PreferenceModule(str(out / "model"), loss="sppo_hard", beta=0.1, reference="cached",
                              optimizer="rmsprop", lr=5e-7, warmup_ratio=0.1)
    data = PreferenceDataModule(train_data=str(out / "pairs.jsonl"), tokenizer=str(out / "model"), batch_size=BATCH, max_length=2048,
                                max_prompt_length=1024)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[clock])
    trainer.fit(module, datamodule=data)
    return {"seconds": clock.seconds, "peak_rss_mb": rss_mb(), "rss_before_train_mb": clock.rss_before}


def run_trl(out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_before, self.start = rss_mb(), time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    } for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    clock = Clock()
    config = DPOConfig(
        output_dir=str(out / "trl"), loss_type=["sppo_hard"], beta=0.1, per_device_train_batch_size=BATCH,
        num_train_epochs=1, learning_rate=5e-7, optim="rmsprop", lr_scheduler_type="linear", warmup_steps=0.1,
        max_grad_norm=1.0, max_length=2048, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
        seed=42, dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return {"seconds": clock.seconds, "peak_rss_mb": rss_mb(), "rss_before_train_mb": clock.rss_before}


def summarise(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.side:
        result = run_ours(Path(args.dir)) if args.side == "ours" else run_trl(Path(args.dir))
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prepare(out)
        info = json.loads((out / "info.json").read_text())
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for _ in range(args.repeats):
            for side in ("ours", "trl"):
                done = subprocess.run([sys.executable, __file__, "--side", side, "--dir", tmp], env=env,
                                      capture_output=True, text=True, check=False)
                lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
                if not lines:
                    raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
                runs[side].append(json.loads(lines[-1][len("RESULT "):]))
    tokens = info["real_tokens"]
    speed = [tokens / o["seconds"] / (tokens / t["seconds"]) for o, t in zip(runs["ours"], runs["trl"])]
    memory = [o["peak_rss_mb"] / t["peak_rss_mb"] for o, t in zip(runs["ours"], runs["trl"])]
    growth = [(o["peak_rss_mb"] - o["rss_before_train_mb"]) / max(1.0, t["peak_rss_mb"] - t["rss_before_train_mb"])
              for o, t in zip(runs["ours"], runs["trl"])]
    import lightning
    import transformers
    import trl

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}, lightning {lightning.__version__}, trl {trl.__version__}",
        "model_params": info["params"], "real_tokens_per_epoch": tokens, "response_tokens": info["response_tokens"],
        "ours_tokens_per_s": [tokens / r["seconds"] for r in runs["ours"]],
        "trl_tokens_per_s": [tokens / r["seconds"] for r in runs["trl"]],
        "ours_peak_rss_mb": [r["peak_rss_mb"] for r in runs["ours"]],
        "trl_peak_rss_mb": [r["peak_rss_mb"] for r in runs["trl"]],
        "throughput_ratio_min_median_max": summarise(speed),
        "peak_rss_ratio_min_median_max": summarise(memory),
        "training_rss_growth_ratio_min_median_max": summarise(growth),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
