"""The live engine (VLLMGenerator live: true): one vLLM engine for the run, fed π's weights in memory.
Greedy vLLM equals greedy HF after every sync (full-weight and LoRA), the live engine samples what an
engine started on an export samples, and J-BOND and the online method run on it through the CLI."""

import json
import time

import pytest
import torch
import yaml

from sppo_lightning.generation import eos_ids
from sppo_lightning.models import LoraSettings, add_lora, load_causal_lm
from sppo_lightning.pipeline import DistContext, VLLMGenerator
from sppo_lightning.pipeline.live_weights import engine_folder, policy_weights
from sppo_lightning.pipeline.policy_export import export_policy
from sppo_lightning.pipeline.vllm_engine import EngineProcess
from tests_vllm.test_vllm import CPU_ENV, ENGINE, REPO, fit, greedy, hf_greedy

GENERATOR = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True, "kv_cache_gib": 1,
             "show_progress": False}


# The README's one switch from HF generate to the live engine, for any recipe (vLLM environment).
SWITCH = ("--data.method.generator sppo_lightning.pipeline.VLLMGenerator --data.method.generator.dtype float32 "
          "--data.method.generator.max_model_len 256 --data.method.generator.kv_cache_gib 1 "
          "--data.method.generator.enforce_eager true")


def policy_of(llama: str, kind: str):
    torch.manual_seed(0)
    model = load_causal_lm(llama)
    if kind == "lora":  # adapters that already change the function, as after training
        model = add_lora(model, LoraSettings(r=8, alpha=16, extra={"init_lora_weights": False}))
    return model


def train_steps(model, prompts, steps: int = 2) -> None:
    """Real optimizer steps (next-token loss on the prompts): π moves between syncs."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(steps):
        for prompt in prompts:
            ids = torch.tensor([prompt.ids])
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_after_every_sync_greedy_vllm_equals_greedy_hf(tmp_path, llama, tokenizer, prompts, kind):
    policy = policy_of(llama, kind)
    inner = policy.get_base_model() if kind == "lora" else policy
    stop = sorted(eos_ids(inner, tokenizer))
    folder = engine_folder(policy, tokenizer, tmp_path / "config")
    assert not list(folder.glob("*.safetensors"))  # the engine starts without weights
    engine = EngineProcess(str(folder), {**ENGINE, "load_format": "dummy"}, CPU_ENV, log_path=tmp_path / "vllm.log")
    try:
        before = None
        for sync in range(3):
            train_steps(policy, prompts)
            seconds = engine.load_weights(policy_weights(policy), bucket_bytes=1 << 16)  # many small buckets
            assert seconds < 30
            expected = hf_greedy(policy, tokenizer, prompts, 24)
            got = engine.generate([(p.ids, greedy(24, stop)) for p in prompts])
            assert got == expected, sync
            assert got != before  # training changed what the policy writes, and the engine followed
            before = got
    finally:
        engine.close()


def test_the_live_engine_samples_what_an_engine_on_the_export_samples(tmp_path, llama, tokenizer, prompts):
    """Two iterations with training between: the same seeds give the same responses, live or exported."""
    policy = policy_of(llama, "full")
    live = VLLMGenerator(max_new_tokens=16, batch_size=2, temperature=1.0, top_p=1.0, **GENERATOR)
    exported = VLLMGenerator(max_new_tokens=16, batch_size=2, temperature=1.0, top_p=1.0, live=False, **GENERATOR)
    assert live.live and not exported.live and not live.exports_policy(policy) and exported.exports_policy(policy)
    try:
        for iteration in range(2):
            mine = live.sample(policy, tokenizer, prompts, 3, 1234 + iteration, DistContext())
            export = export_policy(policy, tokenizer, tmp_path / f"iteration_{iteration + 1}" / "policy")
            theirs = exported.sample(export, tokenizer, prompts, 3, 1234 + iteration, DistContext())
            exported.release()
            assert mine == theirs, iteration
            train_steps(policy, prompts)
        assert len(live.sync_seconds) == 2 and live._engine is not None  # one engine, two syncs
        live.release()
        assert live._engine is not None and live._engine.alive  # release keeps a live engine
    finally:
        live.close()
    assert live._engine is None


def live_config(out_dir, llama, source: str, epochs: int, **method) -> str:
    """A shipped recipe with its generator swapped for a live VLLMGenerator: the documented switch."""
    data = yaml.safe_load((REPO / "configs" / source).read_text())
    data["model"]["init_args"]["model_name_or_path"] = llama
    data["trainer"].update(default_root_dir=str(out_dir), max_epochs=epochs)
    generator = data["data"]["init_args"]["method"]["init_args"]["generator"]
    sampling = {k: v for k, v in generator["init_args"].items() if k in ("temperature", "top_p", "max_new_tokens",
                                                                        "batch_size")}
    generator.update(class_path="sppo_lightning.pipeline.VLLMGenerator",
                     init_args={**sampling, **GENERATOR, "log_dir": str(out_dir)})
    data["data"]["init_args"]["method"]["init_args"].update(method)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def readme_llama(tmp_path_factory):
    """The model the README's vLLM commands build: `python -m sppo_lightning.testing .tiny --vllm`,
    which writes only .tiny/llama_vllm (the quickstart's models are left alone)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("readme_models")
    (out / "llama").mkdir()
    (out / "llama" / "mine.txt").write_text("the quickstart's model, not to be touched")
    subprocess.run([sys.executable, "-m", "sppo_lightning.testing", str(out), "--vllm"], check=True,
                   capture_output=True, cwd=REPO)
    assert sorted(p.name for p in out.iterdir()) == ["llama", "llama_vllm"]
    assert [p.name for p in (out / "llama").iterdir()] == ["mine.txt"]
    return str(out / "llama_vllm")


def test_jbond_on_the_live_engine_raises_its_win_rate(tmp_path, readme_llama):
    """configs/jbond.yaml as shipped (48 on-policy steps), sampled by the live engine: the policy and
    its anchor swapped into one engine at every step, the win rate measured with it too."""
    data = yaml.safe_load((REPO / "configs" / "jbond.yaml").read_text())  # as shipped: the model and root set
    data["model"]["init_args"]["model_name_or_path"] = readme_llama
    data["trainer"]["default_root_dir"] = str(tmp_path / "jbond")
    config = tmp_path / "jbond.yaml"
    config.write_text(yaml.safe_dump(data))
    start = time.perf_counter()
    result = fit(config, *SWITCH.split(), "--data.method.generator.log_dir", str(tmp_path / "jbond"))
    seconds = time.perf_counter() - start
    summary = json.loads((tmp_path / "jbond" / "bond" / "summary.json").read_text())["iterations"]
    rates = [row["win_rate_vs_initial"] for row in summary if row.get("win_rate_vs_initial") is not None]
    # As the recipe's HF test asserts: measured every 16 steps, rising, the last above 0.6 (the initial
    # policy's own is 0.5). The first measurement is close to 0.5 on today's libraries (0.496 with this
    # code and with the code before it: the same digits), above 0.6 when this test was written.
    assert len(rates) == 3 and rates[-1] > 0.6 and rates[-1] > rates[0], rates
    console = result.stdout + result.stderr
    assert "one live engine for the run, fed π's weights in memory" in " ".join(console.split())
    assert (tmp_path / "jbond" / "vllm_rank0.log").exists() and seconds < 600


def test_the_online_method_on_the_live_engine(tmp_path, readme_llama):
    result = fit(live_config(tmp_path / "online", readme_llama, "online.yaml", epochs=6))
    summary = json.loads((tmp_path / "online" / "online" / "summary.json").read_text())["iterations"]
    assert len(summary) == 6 and all(row["pairs"] > 0 for row in summary)
    assert "one live engine for the run" in " ".join((result.stdout + result.stderr).split())


def test_a_qlora_policy_is_streamed_dequantised_and_merged(tmp_path, llama, tokenizer, prompts):
    """QLoRA (a 4-bit base on CPU, bitsandbytes): the live engine gets each 4-bit weight dequantised with
    the adapter's delta added, and samples greedily what HF samples from the export's merged fp32 copy."""
    from transformers import AutoModelForCausalLM

    from sppo_lightning.models import export_hf

    torch.manual_seed(0)
    policy = add_lora(load_causal_lm(llama, quantize_4bit=True),
                      LoraSettings(r=8, alpha=16, extra={"init_lora_weights": False})).eval()
    folder = engine_folder(policy, tokenizer, tmp_path / "config")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    engine = EngineProcess(str(folder), {**ENGINE, "load_format": "dummy"}, CPU_ENV, log_path=tmp_path / "vllm.log")
    try:
        engine.load_weights(policy_weights(policy))
        merged = AutoModelForCausalLM.from_pretrained(
            export_hf(policy, tokenizer, tmp_path / "merged", merged_dtype=torch.float32)).eval()
        stop = sorted(eos_ids(merged, tokenizer))
        got = engine.generate([(p.ids, greedy(24, stop)) for p in prompts])
        assert got == hf_greedy(merged, tokenizer, prompts, 24)
    finally:
        engine.close()


def test_an_fsdp_policy_samples_on_every_ranks_engine_what_one_process_samples(tmp_path, llama):
    """FSDP + LoRA over 2 CPU processes (gloo), one live engine per rank, each fed the weights gathered
    unit by unit: the iteration's generations (and so its rankings) equal one LoRA process's on one
    engine, and every rank synced twice (the initial policy for the win rate's baseline, the trained
    one for the win rate); no engine outlives the run."""
    import pyarrow.parquet as pq

    from tests.helpers import run_fsdp as run

    for name, devices in (("one", 1), ("two", 2)):
        run("self_play", llama, tmp_path / name, devices, "--generator", "vllm")
    for stage in ("generations", "rankings"):
        one = pq.read_table(tmp_path / "one" / "self_play" / "iteration_1" / f"{stage}.parquet").to_pylist()
        two = pq.read_table(tmp_path / "two" / "self_play" / "iteration_1" / f"{stage}.parquet").to_pylist()
        assert one == two, stage
    assert [json.loads((tmp_path / "two" / f"syncs_rank{r}.json").read_text()) for r in (0, 1)] == [2, 2]
    assert all((tmp_path / "two" / f"vllm_rank{r}.log").exists() for r in (0, 1))  # an engine on each rank
    summary = json.loads((tmp_path / "two" / "self_play" / "summary.json").read_text())["iterations"]
    assert len(summary) == 1 and summary[0]["win_rate_vs_initial"] is not None
