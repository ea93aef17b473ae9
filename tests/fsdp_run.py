"""Runs for the FSDP tests, on 1 process or on 2 CPU processes (FSDP2 over gloo).

    python tests/fsdp_run.py train <model_dir> <out_dir> <devices> [--kill-marker M] [--resume]
    python tests/fsdp_run.py self_play <model_dir> <out_dir> <devices>

``train``: SPPO on a fixed pair file in file order (global batch 4: 4 pairs on 1 process, 2 per
rank on 2), 2 epochs, one checkpoint per epoch, export at the end; every rank appends its per-step
losses to ``losses_rank<r>.jsonl``. ``devices`` 1 trains the ``full`` footprint, 2 ``fsdp``.
``self_play``: one SPPO iteration with LoRA (``lora`` on 1 process, ``fsdp`` + LoRA on 2).
"""

import argparse
import json
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from sppo_lightning.callbacks.hf_export import HFExport
from sppo_lightning.callbacks.self_play import SelfPlay
from sppo_lightning.data import PreferenceDataModule, SelfPlayDataModule
from sppo_lightning.methods import SPPO
from sppo_lightning.pipeline import HFGenerator
from sppo_lightning.models import LoraSettings
from sppo_lightning.module import PreferenceModule
from sppo_lightning.ranking import FunctionJudge

QUESTIONS = ["Tell me about the moon.", "What is 2 plus 3?", "Why is the sky blue?", "Name a color.",
             "What is 4 plus 4?", "Say something about the dog.", "Explain the river.", "Why is the cat good?"]


class LossLog(L.Callback):
    """Appends (step, loss) of every training batch of this rank."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with (self.out / f"losses_rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")


class KillAt(L.Callback):
    """SIGKILL every rank at the start of epoch 1's second batch, once (a marker file per rank)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        marker = Path(f"{self.marker}.{trainer.global_rank}")
        if trainer.current_epoch == 1 and batch_idx == 1 and not marker.exists():
            marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


def trainer_for(devices: int, out: Path, callbacks: list, **kwargs) -> L.Trainer:
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     default_root_dir=str(out), gradient_clip_val=1.0, **kwargs)


def train(model_dir: str, out: Path, devices: int, kill_marker: str, resume: bool) -> None:
    pairs = out.parent / "pairs.jsonl"
    if not pairs.exists():
        rows = []
        for i, q in enumerate(QUESTIONS):
            rows.append({"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": "Yes, it is good."}],
                         "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "No " * (i + 1)}],
                         "chosen_probs": 0.8, "chosen_probs_win": 0.6 + 0.03 * i, "chosen_probs_lose": 0.35})
        pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    L.seed_everything(0)
    datamodule = PreferenceDataModule(train_data=str(pairs), tokenizer=model_dir, batch_size=4 // devices,
                                      max_prompt_length=32, max_length=64, shuffle=False)
    # Activation checkpointing on, as on GPUs: it must compose with the sharding.
    module = PreferenceModule(model_dir, loss="sppo", eta=10.0, reference="copy", lr=5e-4, warmup_ratio=0.0,
                              footprint="fsdp" if devices > 1 else "full", gradient_checkpointing=True)
    callbacks = [LossLog(out), ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True),
                 HFExport(str(out / "hf_model"))]
    if kill_marker:
        callbacks.append(KillAt(kill_marker))
    trainer = trainer_for(devices, out, callbacks, max_epochs=2)
    trainer.fit(module, datamodule=datamodule, ckpt_path="last" if resume else None)


def self_play(model_dir: str, out: Path, devices: int) -> None:
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS[:6]))
    L.seed_everything(0)
    method = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"),
                  HFGenerator(max_new_tokens=8, batch_size=2, show_progress=False), num_samples=3,
                  reference_batch_size=1, show_progress=False)
    datamodule = SelfPlayDataModule(method, prompts=str(prompts), eval_prompts=str(prompts), tokenizer=model_dir,
                                    batch_size=2, max_prompt_length=32, run_dir=str(out / "self_play"))
    module = PreferenceModule(model_dir, loss="sppo", eta=10.0, reference="cached", lr=1e-3,
                              lora=LoraSettings(r=4, alpha=8), footprint="fsdp" if devices > 1 else "lora")
    # 6 prompts in batches of 2: 3 generate calls, so one rank runs an extra synced one.
    trainer = trainer_for(devices, out, [SelfPlay()], max_epochs=1, enable_checkpointing=False,
                          reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "self_play"])
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("devices", type=int)
    parser.add_argument("--kill-marker", default="")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "train":
        train(args.model_dir, out, args.devices, args.kill_marker, args.resume)
    else:
        self_play(args.model_dir, out, args.devices)
