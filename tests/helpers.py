"""What several test files share: the repository's paths, the CLI run through a subprocess, the
quickstart and pair configs, the small self-play run in Python, resume comparisons, IFEval's own
counting. Test files import from here, never from one another."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from if_verifiable.api import evaluate_output_for_sample
from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as IFBENCH
from if_verifiable.types import IFBenchSample, IFEvalSample
from safetensors.torch import load_file

from sppo_lightning.data.prompts import instruction_meta
from sppo_lightning.datamodules import PreferenceDataModule, SelfPlayDataModule
from sppo_lightning.methods import SPPO
from sppo_lightning.module import PreferenceModule
from sppo_lightning.ranking import FunctionJudge
from tests import self_play_setup


REPO = Path(__file__).resolve().parents[1]


SCRIPT = Path(sys.executable).with_name("sppo-lightning")


def tiny_config(config: Path, tiny_dir: Path, out_dir: Path) -> Path:
    """The config with the tiny models and every output (logs, checkpoints, run dirs) under out_dir."""
    data = yaml.safe_load(Path(config).read_text())
    data["model"]["init_args"]["model_name_or_path"] = str(tiny_dir / "llama")
    trainer = data["trainer"]
    trainer["default_root_dir"] = str(out_dir)
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"]["init_args"]["save_dir"] = str(out_dir)
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(out_dir / "checkpoints")
    path = out_dir / f"config_{Path(config).stem}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_fit(config, tiny_dir, out_dir, *extra, env=None, check=True):
    """`sppo-lightning fit` on a config, with the tiny models and outputs redirected."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "sppo_lightning.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO), **(env or {}))
    result = subprocess.run(
        command + ["fit", "--config", str(tiny_config(config, tiny_dir, out_dir)), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_cli(*args, check=True):
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "sppo_lightning.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        command + [str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def fit_pairs(tmp_path, tiny_llama, *extra, check=True, subcommand="fit"):
    return run_cli(
        subcommand, "--config", "configs/tiny_pairs.yaml",
        "--model.model_name_or_path", tiny_llama,
        "--trainer.default_root_dir", tmp_path,
        *extra,
        check=check,
    )


def quickstart(tmp_path: Path, epochs: int = 1, prompts: list[str] | None = None, judge: str | None = None,
               **method) -> Path:
    """configs/quickstart.yaml with fewer epochs, optionally other prompts, judge or SPPO settings."""
    data = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    data["trainer"]["max_epochs"] = epochs
    if "run_dir" in method:
        data["data"]["init_args"]["run_dir"] = method.pop("run_dir")
    settings = data["data"]["init_args"]["method"]["init_args"]
    settings.update(method)
    if judge:
        settings["ranker"]["init_args"]["function"] = judge
    if prompts is not None:
        path = tmp_path / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        data["data"]["init_args"]["prompts"] = str(path)
    config = tmp_path / "source.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def batch_of(pair_file, tiny_llama, batch_size=4):
    dm = PreferenceDataModule(train_data=pair_file, tokenizer=tiny_llama, batch_size=batch_size)
    dm.setup("fit")
    return dm, next(iter(torch.utils.data.DataLoader(
        dm.train_examples, batch_size=batch_size, collate_fn=dm.train_dataloader().collate_fn
    )))


def losses(out_dir: Path) -> dict[int, float]:
    """train/loss by global step, over every logger version (a resumed run writes a new one)."""
    steps = {}
    for metrics in sorted(out_dir.glob("lightning_logs/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss"):
                steps[int(row["step"])] = float(row["train/loss"])
    return steps


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    """The run's exported model (HFExport), or, for a recipe without one, its last checkpoint's weights."""
    export = out_dir / "hf_model" / "model.safetensors"
    if not export.exists():
        return torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    return load_file(export)


def assert_same_run(baseline: Path, resumed: Path, steps: int | None = None) -> None:
    """The resumed run logged the baseline's loss at every step and ended with its weights."""
    expected, got = losses(baseline), losses(resumed)
    assert set(got) == set(expected) and (steps is None or len(expected) == steps)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    want, have = final_weights(baseline), final_weights(resumed)
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6)


def uninterrupted(config: Path, tiny_dir: Path, out: Path, *extra: str) -> Path:
    """Run ``config`` (with the killing judge) to its end: its kill marker already exists, so the
    judge never kills. The baseline a killed and resumed run is compared with."""
    marker = out / "never"
    marker.write_text("the baseline never dies")
    run_fit(config, tiny_dir, out, *extra, env={"KILL_MARKER": str(marker)})
    return out


QUESTIONS = ["Tell me about the moon.", "What is 2 plus 3?", "Why is the sky blue?", "Name a color.",
             "What is 4 plus 4?", "Say something about the dog."]


def write_prompts(path, questions):
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return str(path)


def fit_self_play(tmp_path, tiny_llama, ranker=None, max_epochs=1, epochs_per_iteration=1, run_dir=None,
        callbacks=(), **options):
    settings = dict(num_samples=3, max_new_tokens=8, generation_batch_size=4, show_progress=False,
                    run_dir=str(run_dir or tmp_path / "self_play"))
    settings.update(options)
    method, callback, run_dir = self_play_setup.parts(
        SPPO, ranker or FunctionJudge("sppo_lightning.ranking.judges:shorter"), **settings)
    datamodule = SelfPlayDataModule(
        method, prompts=write_prompts(tmp_path / "prompts.jsonl", QUESTIONS),
        eval_prompts=write_prompts(tmp_path / "eval.jsonl", QUESTIONS[:3]),
        tokenizer=tiny_llama, batch_size=4, max_prompt_length=32, epochs_per_iteration=epochs_per_iteration,
        run_dir=run_dir,
    )
    module = PreferenceModule(tiny_llama, loss="sppo", eta=10.0, reference="cached", lr=1e-3, warmup_ratio=0.5)
    trainer = self_play_setup.trainer(max_epochs=max_epochs, default_root_dir=tmp_path, callbacks=[callback, *callbacks])
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, callback


class CountingJudge(FunctionJudge):
    """The ``shorter`` judge, recording how many prompts each call ranks."""

    def __init__(self):
        super().__init__("sppo_lightning.ranking.judges:shorter")
        self.sizes = []

    def pairwise_logits(self, prompts, candidates):
        self.sizes.append(len(prompts))
        return super().pairwise_logits(prompts, candidates)


def ifeval_reference(rows, responses):
    """IFEval's generate_report over if-verifiable's own per-instruction results: prompt-level =
    prompts whose every instruction is followed; instruction-level = followed / all instructions,
    an empty response failing each of its instructions."""
    numbers = {}
    for mode in ("strict", "loose"):
        prompt_correct = instruction_total = instruction_correct = 0
        for row, response in zip(rows, responses):
            meta = instruction_meta(row)
            ifbench = meta["instruction_id_list"][0] in IFBENCH
            sample = (IFBenchSample if ifbench else IFEvalSample)(row["key"], row["prompt"],
                                                                 meta["instruction_id_list"], meta["kwargs"])
            results, _ = evaluate_output_for_sample("ifbench" if ifbench else "ifeval", sample, response)
            follow = [getattr(r, f"{mode}_pass") for r in results] or [False] * len(meta["instruction_id_list"])
            prompt_correct += all(follow)
            instruction_total += len(follow)
            instruction_correct += sum(follow)
        numbers[f"prompt_{mode}"] = prompt_correct / len(rows)
        numbers[f"instruction_{mode}"] = instruction_correct / instruction_total
    return numbers


FSDP_SCRIPT = Path(__file__).with_name("fsdp_run.py")


def run_fsdp(*args, expect_killed=False):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(FSDP_SCRIPT.parent.parent))
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)  # a fresh rendezvous on a free port, whatever ran in this process before
    result = subprocess.run([sys.executable, str(FSDP_SCRIPT), *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=600)
    if expect_killed:
        assert result.returncode == -9, result.stderr[-3000:]
    else:
        assert result.returncode == 0, "\n".join(l for l in result.stderr.splitlines() if "Warning" not in l)[-6000:]
