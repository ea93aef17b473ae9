"""Self-play on N CPU processes (DDP, gloo). Run by tests/test_self_play_ddp.py.

    python tests/ddp_self_play.py <model_dir> <out_dir> <devices> [sppo|online]

``sppo``: one SPPO iteration. ``online``: two steps of the online method with π_t's log-probs as the
reference, 4 prompts a step whatever the number of processes (its draws stay in memory).
"""

import json
import sys
from pathlib import Path

import lightning as L

from sppo_lightning.callbacks.self_play import SelfPlay
from sppo_lightning.datamodules import SelfPlayDataModule
from sppo_lightning.methods import SPPO, OnlinePairs
from sppo_lightning.module import PreferenceModule
from sppo_lightning.pipeline import HFGenerator
from sppo_lightning.ranking import FunctionJudge

QUESTIONS = ["Tell me about the moon.", "What is 2 plus 3?", "Why is the sky blue?", "Name a color.",
             "What is 4 plus 4?", "Say something about the dog.", "Explain the river.", "Why is the cat good?"]


def main(model_dir: str, out_dir: str, devices: int, method_name: str = "sppo") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    L.seed_everything(0)
    judge, generator = FunctionJudge("sppo_lightning.ranking.judges:shorter"), HFGenerator(max_new_tokens=8, batch_size=2,
                                                                                          show_progress=False)
    if method_name == "online":
        method = OnlinePairs(judge, generator, num_samples=3, reference="iteration")
        module = PreferenceModule(model_dir, loss="dpo", reference="cached", lr=1e-3)
        batch_size, epochs = 4 // devices, 2
    else:
        method = SPPO(judge, generator, num_samples=3, show_progress=False)
        module = PreferenceModule(model_dir, loss="sppo", eta=10.0, reference="cached", lr=1e-3)
        batch_size, epochs = 2, 1
    datamodule = SelfPlayDataModule(method, prompts=str(prompts), eval_prompts=str(prompts), tokenizer=model_dir,
                                    batch_size=batch_size, max_prompt_length=32, run_dir=str(out / "self_play"))
    callback = SelfPlay()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=epochs,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback], default_root_dir=str(out), reload_dataloaders_every_n_epochs=1,
    )
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
