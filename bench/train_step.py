"""Training throughput and peak memory: ours packed, ours padded, TRL live reference, TRL precompute.

    python bench/train_step.py                        # both length profiles, 1 repeat: about 35 minutes on 2 cores
    python bench/train_step.py --profiles bench --repeats 3

Ours: ``PreferenceModule`` with the SPPO-hard loss and *cached* reference log-probs (what self-play
produces), through a Lightning ``Trainer``, once with ``packing`` (each prompt once, pairs packed
without padding; ``sppo_lightning.packing``) and once padded. Our reference stage (the log-probs
of every pair under the initial model, as ``pipeline/stages.reference_logps`` computes them, in
the same layout) runs in the same process and counts in the end-to-end time. Baselines: TRL's
``DPOTrainer(loss_type=["sppo_hard"])`` with a live reference model, and with
``precompute_ref_log_probs=True`` (its reference pass before training counts in its end-to-end
time). Same offline Llama (~35M parameters, 32k vocabulary), batch of 4 pairs, RMSprop at 5e-7
with 10% warmup, gradient clipping at 1.0, one epoch, fp32 on CPU.

Length profiles: ``bench`` (40 pairs, prompts 15-60 words, responses 16-320 words) and
``longtail`` (16 pairs, prompts 50-500 and responses 50-1,500 tokens, log-uniform: a self-play
profile like UltraFeedback's).

Each side runs in its own process so that its peak RSS is its own. Reported per profile: real
(non-padding, prompt counted once per response) tokens per second end to end (ours: tokenizing,
reference stage, training; TRL: building the trainer, which tokenizes and runs the precompute pass,
and training) and of training alone, peak RSS, and the ratios against TRL and packed/padded.
"""

from __future__ import annotations

import argparse
import inspect
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
BATCH = 4
# pairs, (prompt min, max), (response min, max) in words, log-uniform draw
PROFILES = {"bench": (40, (15, 60), (16, 320), False), "longtail": (16, (50, 500), (50, 1500), True)}
SIDES = ("ours-packed", "ours-padded", "trl", "trl-precompute")


def prepare(out: Path, profile: str) -> None:
    """The model and the pair data (plain strings; our sides add their own reference log-probs)."""
    from transformers import LlamaForCausalLM

    from sppo_lightning.data.rows import PreferenceRow
    from sppo_lightning.data.tokenize import encode_row
    from sppo_lightning.testing import WORDS, llama_config, make_tiny_tokenizer

    pairs, prompt_words, response_words, log_uniform = PROFILES[profile]
    tokenizer = make_tiny_tokenizer()
    config = llama_config(tokenizer, vocab_size=32_000, hidden_size=384, intermediate_size=1024,
                          num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                          max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    g = torch.Generator().manual_seed(0)

    def draw(low: int, high: int) -> int:
        if log_uniform:
            return int(low * (high / low) ** float(torch.rand((), generator=g)))
        return int(torch.randint(low, high, (1,), generator=g))

    def text(n_words: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=g).tolist())

    rows = []
    for _ in range(pairs):
        prompt = text(draw(*prompt_words))
        chosen, rejected = (text(draw(*response_words)) for _ in range(2))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    examples = [encode_row(tokenizer, PreferenceRow([{"role": "user", "content": r["prompt"]}], r["chosen"],
                                                    r["rejected"], {}, {}), 4096, 1024) for r in rows]
    # Real tokens as padded training computes them: the prompt before each response.
    tokens = sum(2 * len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples)
    lengths = [len(ex["chosen_ids"]) for ex in examples] + [len(ex["rejected_ids"]) for ex in examples]
    prompts = [len(ex["prompt_ids"]) for ex in examples]
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"real_tokens": tokens, "params": sum(p.numel() for p in model.parameters()),
            "response_tokens": [min(lengths), max(lengths)], "prompt_tokens": [min(prompts), max(prompts)],
            "pairs": pairs}
    (out / "info.json").write_text(json.dumps(info))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(out: Path, packing: bool) -> dict:
    import lightning as L

    from sppo_lightning.datamodules import PreferenceDataModule
    from sppo_lightning.distributed import DistContext
    from sppo_lightning.module import PreferenceModule
    from sppo_lightning.packing import resolve_packing
    from sppo_lightning.pipeline.stages import reference_logps

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.rss_before, self.start = rss_mb(), time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    # Tokenizing, then the reference stage: the initial model's log-probs of every pair, in this
    # side's layout (the module's default packing_tokens), as self-play's reference stage does.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")  # TRL's sides load theirs untimed too
    start = time.perf_counter()
    data = PreferenceDataModule(train_data=str(out / "pairs.jsonl"), tokenizer=str(out / "model"), batch_size=BATCH,
                                max_length=4096, max_prompt_length=1024)
    data.setup("fit")
    tokenize_seconds = time.perf_counter() - start
    pairs = [dict(ex) for ex in data.train_examples]
    budget = inspect.signature(PreferenceModule).parameters["packing_tokens"].default
    reference_logps(model, pairs, data.tokenizer.pad_token_id, BATCH, DistContext(),
                    packing=resolve_packing(packing, budget, model))
    reference_seconds = time.perf_counter() - start - tokenize_seconds
    del model
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    for row, pair in zip(rows, pairs):
        row["reference_chosen_logps"], row["reference_rejected_logps"] = (
            pair["reference_chosen_logps"], pair["reference_rejected_logps"])
    path = out / f"pairs_{os.getpid()}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    clock = Clock()
    module = PreferenceModule(str(out / "model"), loss="sppo_hard", beta=0.1, reference="cached",
                              optimizer="rmsprop", lr=5e-7, warmup_ratio=0.1, packing=packing)
    data = PreferenceDataModule(train_data=str(path), tokenizer=str(out / "model"), batch_size=BATCH, max_length=4096,
                                max_prompt_length=1024)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[clock])
    trainer.fit(module, datamodule=data)
    return {"train_seconds": clock.seconds, "total_seconds": clock.seconds + tokenize_seconds + reference_seconds,
            "reference_seconds": reference_seconds, "peak_rss_mb": rss_mb(), "rss_before_train_mb": clock.rss_before}


def run_trl(out: Path, precompute: bool) -> dict:
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
        max_grad_norm=1.0, max_length=4096, precompute_ref_log_probs=precompute, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
        seed=42, dataloader_num_workers=0,
    )
    start = time.perf_counter()  # the trainer tokenizes, and with precompute_ref_log_probs runs its reference pass, here
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    total = time.perf_counter() - start
    return {"train_seconds": clock.seconds, "total_seconds": total, "peak_rss_mb": rss_mb(),
            "rss_before_train_mb": clock.rss_before}


def summarise(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def run_profile(profile: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prepare(out, profile)
        info = json.loads((out / "info.json").read_text())
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for _ in range(repeats):
            for side in SIDES:
                done = subprocess.run([sys.executable, __file__, "--side", side, "--dir", tmp], env=env,
                                      capture_output=True, text=True, check=False)
                lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
                if not lines:
                    raise SystemExit(f"{profile} {side} failed:\n{done.stderr[-3000:]}")
                runs[side].append(json.loads(lines[-1][len("RESULT "):]))
    tokens = info["real_tokens"]

    def ratio(a: str, b: str, key: str, per_token: bool = True) -> str:
        values = [(y[key] / x[key]) if per_token else (x[key] / y[key]) for x, y in zip(runs[a], runs[b])]
        return summarise(values)

    report = {**info,
              "tokens_per_s_end_to_end": {s: [round(tokens / r["total_seconds"], 1) for r in runs[s]] for s in SIDES},
              "tokens_per_s_training": {s: [round(tokens / r["train_seconds"], 1) for r in runs[s]] for s in SIDES},
              "peak_rss_mb": {s: [round(r["peak_rss_mb"]) for r in runs[s]] for s in SIDES},
              "reference_stage_s": {s: [round(r["reference_seconds"], 2) for r in runs[s]] for s in SIDES[:2]}}
    report["ratios (min / median / max)"] = {
        "end to end, ours packed / TRL precompute": ratio("ours-packed", "trl-precompute", "total_seconds"),
        "end to end, ours padded / TRL precompute": ratio("ours-padded", "trl-precompute", "total_seconds"),
        "training, ours packed / TRL live": ratio("ours-packed", "trl", "train_seconds"),
        "training, packed / padded": ratio("ours-packed", "ours-padded", "train_seconds"),
        "reference stage, packed / padded": ratio("ours-packed", "ours-padded", "reference_seconds"),
        "peak RSS, packed / padded": ratio("ours-packed", "ours-padded", "peak_rss_mb", per_token=False),
        "peak RSS, packed / TRL precompute": ratio("ours-packed", "trl-precompute", "peak_rss_mb", per_token=False),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=list(PROFILES))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.side:
        out = Path(args.dir)
        result = (run_ours(out, args.side == "ours-packed") if args.side.startswith("ours")
                  else run_trl(out, args.side == "trl-precompute"))
        print("RESULT " + json.dumps(result))
        return
    import lightning
    import transformers
    import trl

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}, transformers {transformers.__version__}, lightning "
                         f"{lightning.__version__}, trl {trl.__version__}"}
    for profile in args.profiles:
        report[profile] = run_profile(profile, args.repeats)
        print(json.dumps({profile: report[profile]}, indent=2), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
