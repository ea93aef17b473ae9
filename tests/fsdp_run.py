"""Runs for the FSDP tests, on 1 process or on 2 CPU processes (FSDP2 over gloo).

    python tests/fsdp_run.py train <model_dir> <out_dir> <devices> [--kill-marker M] [--resume]
    python tests/fsdp_run.py self_play <model_dir> <out_dir> <devices> [--generator vllm]
    python tests/fsdp_run.py stream <model_dir> <out_dir> <devices>

``train``: SPPO on a fixed pair file in file order (global batch 4: 4 pairs on 1 process, 2 per
rank on 2), 2 epochs, one checkpoint per epoch, export at the end; every rank appends its per-step
losses to ``losses_rank<r>.jsonl``. ``devices`` 1 trains the ``full`` footprint, 2 ``fsdp``.
``self_play``: one SPPO iteration with LoRA (``lora`` on 1 process, ``fsdp`` + LoRA on 2), sampled
by ``HFGenerator`` or (``--generator vllm``, in the vLLM environment) a live ``VLLMGenerator``, one
engine per rank. ``stream``: what a live engine is fed from an FSDP-sharded policy, full-weight and
LoRA, against the unsharded model's weights (each rank writes ``stream_rank<r>.json``).
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
from sppo_lightning.datamodules import PreferenceDataModule, SelfPlayDataModule
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


def self_play(model_dir: str, out: Path, devices: int, generator: str) -> None:
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS[:6]))
    L.seed_everything(0)
    if generator == "vllm":  # a live engine on every rank, fed the sharded policy's gathered weights
        from sppo_lightning.pipeline import VLLMGenerator

        sampler = VLLMGenerator(max_new_tokens=8, batch_size=2, show_progress=False, dtype="float32",
                                max_model_len=128, enforce_eager=True, kv_cache_gib=1, log_dir=str(out))
    else:
        sampler = HFGenerator(max_new_tokens=8, batch_size=2, show_progress=False)
    method = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"), sampler, num_samples=3,
                  reference_batch_size=1, show_progress=False)
    datamodule = SelfPlayDataModule(method, prompts=str(prompts), eval_prompts=str(prompts), tokenizer=model_dir,
                                    batch_size=2, max_prompt_length=32, run_dir=str(out / "self_play"))
    module = PreferenceModule(model_dir, loss="sppo", eta=10.0, reference="cached", lr=1e-3,
                              lora=LoraSettings(r=4, alpha=8), footprint="fsdp" if devices > 1 else "lora")
    # 6 prompts in batches of 2: 3 generate calls, so one rank runs an extra synced one.
    trainer = trainer_for(devices, out, [SelfPlay()], max_epochs=1, enable_checkpointing=False,
                          reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, datamodule=datamodule)
    if generator == "vllm":
        with (out / f"syncs_rank{trainer.global_rank}.json").open("w") as f:
            json.dump(len(sampler.sync_seconds), f)
        sampler.close()


def stream(rank: int, model_dir: str, out: Path, devices: int, port: int) -> None:
    """One rank of ``stream``: the weights ``policy_weights`` gathers from the sharded policy equal the
    unsharded model's (LoRA merged), exactly, twice in a row; the policy is sharded again after."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from sppo_lightning.models import add_lora, load_causal_lm
    from sppo_lightning.pipeline.live_weights import policy_weights
    from sppo_lightning.sharding import shard_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=devices)
    report = {}
    for kind in ("full", "lora"):
        torch.manual_seed(0)
        policy = load_causal_lm(model_dir)
        if kind == "lora":  # adapters that change the function, so that the merge is seen
            policy = add_lora(policy, LoraSettings(r=4, alpha=8, extra={"init_lora_weights": False}))
        merged = copy.deepcopy(policy)
        expected = (merged.merge_and_unload() if kind == "lora" else merged).state_dict()
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            logits = policy(input_ids=ids).logits
        shard_model(policy, init_device_mesh("cpu", (devices,)), torch.float32)
        for attempt in range(2):
            got = {name: tensor.clone() for name, tensor in policy_weights(policy)}
            assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
            for name, value in expected.items():
                assert not isinstance(got[name], DTensor) and torch.equal(got[name], value), (kind, attempt, name)
        assert all(isinstance(p, DTensor) for p in policy.parameters())  # resharded after the walk
        with torch.no_grad():  # and FSDP still runs its forward as before
            torch.testing.assert_close(policy(input_ids=ids).logits, logits)
        report[kind] = len(got)
    (out / f"stream_rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "self_play", "stream"])
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("devices", type=int)
    parser.add_argument("--kill-marker", default="")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--generator", choices=["hf", "vllm"], default="hf")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "train":
        train(args.model_dir, out, args.devices, args.kill_marker, args.resume)
    elif args.mode == "self_play":
        self_play(args.model_dir, out, args.devices, args.generator)
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(stream, args=(args.model_dir, out, args.devices, port), nprocs=args.devices)
