"""J-BOND's LoRA anchor against a full-weight EMA: how far the adapter EMA drifts over a run.

    python bench/lora_ema.py --steps 48        # about a minute on 2 cores

With LoRA the anchor is a second adapter, and ``EMAAnchor`` averages its A and B factors:
``A_a ← (1-η)A_a + ηA``, ``B_a ← (1-η)B_a + ηB``. The anchor's weight delta is then
``s·B_a·A_a``, which is not the EMA of the policy's deltas ``s·B·A`` (a product of averages is not
an average of products). This script trains J-BOND on the quickstart's tiny Llama with LoRA
(r 4, α 8; configs/jbond.yaml's lr, η and judge, on-policy), and after every optimizer step
compares, over every LoRA layer, the anchor's delta with the exact EMA of the policy's deltas
``D ← (1-η)D + η·s·B·A``. Reported: ‖s·B_a·A_a − D‖ / ‖D‖ at the end and its maximum, and the
error relative to the size of that step's exact EMA move ‖D_t − D_{t-1}‖ (median and max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch


def deltas(policy, adapter: str) -> dict[str, torch.Tensor]:
    """s·B·A of every LoRA layer for ``adapter``."""
    out = {}
    for name, module in policy.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            b, a = module.lora_B[adapter].weight, module.lora_A[adapter].weight
            out[name] = (module.scaling[adapter] * b @ a).detach().double()
    return out


def norm(parts: dict[str, torch.Tensor]) -> float:
    return float(sum(p.pow(2).sum() for p in parts.values()) ** 0.5)


class ExactEMA(L.Callback):
    def __init__(self, eta: float) -> None:
        self.eta, self.relative, self.per_step, self.last = eta, [], [], None

    def on_train_start(self, trainer, pl_module) -> None:
        self.exact = deltas(pl_module.policy, "anchor")
        self.last = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.last:
            return
        self.last = trainer.global_step
        policy = deltas(pl_module.policy, "default")
        previous = {k: v.clone() for k, v in self.exact.items()}
        for k in self.exact:
            self.exact[k].mul_(1 - self.eta).add_(self.eta * policy[k])
        anchor = deltas(pl_module.policy, "anchor")
        error = norm({k: anchor[k] - self.exact[k] for k in anchor})
        self.relative.append(error / max(norm(self.exact), 1e-30))
        self.per_step.append(error / max(norm({k: self.exact[k] - previous[k] for k in anchor}), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--eta", type=float, default=0.3)
    args = parser.parse_args()

    from sppo_lightning.bond import BondModule
    from sppo_lightning.callbacks.ema_anchor import EMAAnchor
    from sppo_lightning.callbacks.self_play import SelfPlay
    from sppo_lightning.datamodules import SelfPlayDataModule
    from sppo_lightning.methods import JBOND
    from sppo_lightning.pipeline import HFGenerator
    from sppo_lightning.models import LoraSettings
    from sppo_lightning.ranking import FunctionJudge

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "sppo_lightning.testing", f"{tmp}/tiny"], check=True, capture_output=True)
        L.seed_everything(42)
        model = f"{tmp}/tiny/llama"
        measure = ExactEMA(args.eta)
        trainer = L.Trainer(max_epochs=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                            callbacks=[SelfPlay(), EMAAnchor(args.eta), measure], reload_dataloaders_every_n_epochs=1)
        method = JBOND(FunctionJudge("sppo_lightning.ranking.judges:positive_words"),
                       HFGenerator(temperature=1.0, top_p=1.0, max_new_tokens=24, show_progress=False))
        trainer.fit(BondModule(model, lr=3e-3, lora=LoraSettings(r=4, alpha=8)),
                    datamodule=SelfPlayDataModule(method, prompts=str(repo / "configs/data/tiny_prompts.jsonl"),
                                                  tokenizer=model, batch_size=4, max_prompt_length=64,
                                                  run_dir=f"{tmp}/bond"))
    print(json.dumps({
        "steps": len(measure.relative), "eta": args.eta,
        "relative_error_final": round(measure.relative[-1], 4),
        "relative_error_max": round(max(measure.relative), 4),
        "error_over_step_median": round(statistics.median(measure.per_step), 3),
        "error_over_step_max": round(max(measure.per_step), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
