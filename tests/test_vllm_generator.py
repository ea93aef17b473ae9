"""The vLLM generator's parts that need no vLLM: requests and their seeds, engine settings, the
per-iteration export of π_t (merged or a LoRA adapter), pruning, and the one-line errors.

Sampling with a real engine is tested in ``tests_vllm/`` (its own environment, see ``.ci/run``)."""

import copy
import json
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sppo_lightning.data.prompts import load_prompts
from sppo_lightning.errors import ConfigError
from sppo_lightning.generation import batch_seed
from sppo_lightning.models import LoraSettings, add_lora, load_causal_lm
from sppo_lightning.pipeline import DistContext, HFGenerator, VLLMGenerator
from sppo_lightning.pipeline.policy_export import PolicyExport, export_policy, lora_mode, offloaded, prune_exports
from sppo_lightning.pipeline.vllm_engine import EngineProcess, engine_reason
from sppo_lightning.ranking import FunctionJudge
from sppo_lightning import seeds

QUESTIONS = ["Tell me about the moon.", "What is 2 plus 3?", "Why is the sky blue?", "Name a color.",
             "What is 4 plus 4?"]


@pytest.fixture
def prompts(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return load_prompts(str(path), tokenizer, 32)[0]


def test_every_request_has_its_own_seed_whatever_the_shard(prompts):
    generator = VLLMGenerator(batch_size=2, max_new_tokens=7, temperature=0.5, top_p=0.8)
    whole = generator.requests(prompts, 3, seed=11, batches=[0, 1, 2], batch_offset=0, stop=[2])
    assert len(whole) == 5 * 3
    assert [ids for ids, _ in whole[::3]] == [p.ids for p in prompts]
    # Prompt 3 is row 1 of batch 1, sample 2: the batch seed indexed by row * K + sample.
    assert whole[3 * 3 + 2][1]["seed"] == seeds.indexed(batch_seed(11, 1), 1 * 3 + 2)
    assert len({s["seed"] for _, s in whole}) == len(whole)
    assert whole[0][1] | {"seed": 0} == {"temperature": 0.5, "top_p": 0.8, "max_tokens": 7, "seed": 0,
                                         "stop_token_ids": [2], "skip_special_tokens": False, "detokenize": False}
    # The shard of prompts 2-4 (batches 1 and 2 of the whole list) asks for exactly the same.
    assert generator.requests(prompts[2:], 3, seed=11, batches=[0, 1], batch_offset=1, stop=[2]) == whole[6:]
    # A rank draws its own batches only.
    assert generator.requests(prompts, 3, seed=11, batches=[1], batch_offset=0, stop=[2]) == whole[6:12]


def test_engine_settings_on_cpu_and_on_one_gpu_of_several(monkeypatch):
    generator = VLLMGenerator(kv_cache_gib=0.5, max_model_len=128, max_new_tokens=16, dtype="float32",
                              engine_kwargs={"enforce_eager": True, "swap_space": 2})
    merged = PolicyExport("/m", None, None, "abc", [2])
    kwargs, env = generator.engine_settings(merged, DistContext())
    assert kwargs == {"dtype": "float32", "enforce_eager": True, "seed": 0, "tensor_parallel_size": 1,
                      "max_model_len": 128, "enable_chunked_prefill": False, "swap_space": 2}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # whole GiB on CPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    adapter = PolicyExport("/base", "/run/iteration_1/policy", 12, "abc", [2])
    kwargs, env = generator.engine_settings(adapter, DistContext(1, 2, torch.device("cuda", 1)))
    assert env["CUDA_VISIBLE_DEVICES"] == "5"  # this rank's GPU: one engine per rank
    assert kwargs["kv_cache_memory_bytes"] == 2**29 and kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["enable_lora"] and kwargs["max_lora_rank"] == 16  # the next rank vLLM accepts
    assert "enable_chunked_prefill" not in kwargs


def test_fingerprint_names_the_engine_and_the_sampling():
    a, b = VLLMGenerator(), VLLMGenerator(top_p=0.95)
    assert a.fingerprint()["class"] == "VLLMGenerator" and "engine" in a.fingerprint()
    assert a.fingerprint() != b.fingerprint() != HFGenerator().fingerprint()


def test_export_policy_writes_a_loadable_model_once_and_reuses_it(tmp_path, tiny_llama, tokenizer):
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama)
    export = export_policy(policy, tokenizer, tmp_path / "iteration_1" / "policy")
    folder = tmp_path / "iteration_1" / "policy"
    assert export.model == str(folder) and export.adapter is None
    assert export.eos_token_ids == [tokenizer.eos_token_id]
    assert json.loads((folder / "export.json").read_text())["checksum"] == export.checksum
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    for (name, a), b in zip(policy.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    written = (folder / "model.safetensors").stat().st_mtime_ns
    time.sleep(0.01)
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)  # a resumed run reuses the export its killed run made
    assert export_policy(policy, tokenizer, folder) == export
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert not list(tmp_path.glob("iteration_1/.policy*"))  # no temporary folder left


def test_a_changed_policy_exports_another_checksum(tmp_path, tiny_llama, tokenizer):
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama)
    first = export_policy(policy, tokenizer, tmp_path / "a")
    with torch.no_grad():
        policy.lm_head.weight.mul_(1.5)
    assert export_policy(policy, tokenizer, tmp_path / "b").checksum != first.checksum


def test_lora_policy_exports_its_adapter_on_the_base_or_a_merged_copy(tmp_path, tiny_llama, tokenizer):
    torch.manual_seed(0)
    policy = add_lora(load_causal_lm(tiny_llama), LoraSettings(r=4, alpha=8, extra={"init_lora_weights": False}))
    assert lora_mode(policy, "auto") == "request"
    request = export_policy(policy, tokenizer, tmp_path / "request")
    assert request.model == tiny_llama and request.adapter == str(tmp_path / "request") and request.lora_rank == 4
    assert (tmp_path / "request" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "request" / "model.safetensors").exists()
    merged = export_policy(policy, tokenizer, tmp_path / "merged", lora="merged")
    assert merged.adapter is None and merged.model == str(tmp_path / "merged")
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    reference = copy.deepcopy(policy).merge_and_unload().state_dict()
    for name, value in weights.items():
        torch.testing.assert_close(value.float(), reference[name].float(), atol=1e-2, rtol=1e-2)
    assert "lora" not in " ".join(weights)
    plain = load_causal_lm(tiny_llama)
    assert lora_mode(plain, "request") == "merged"  # no adapter to hand over
    with pytest.raises(ConfigError, match="lora must be one of"):
        lora_mode(policy, "sometimes")


def test_prune_exports_keeps_the_newest(tmp_path):
    for t in (1, 2, 10):
        (tmp_path / f"iteration_{t}" / "policy").mkdir(parents=True)
    assert prune_exports(tmp_path, -1) == []
    removed = prune_exports(tmp_path, 1)
    assert [p.parent.name for p in removed] == ["iteration_1", "iteration_2"]  # by number, not by name
    assert (tmp_path / "iteration_10" / "policy").is_dir()
    prune_exports(tmp_path, 0)
    assert not list(tmp_path.glob("iteration_*/policy"))


def test_offloading_is_a_no_op_on_cpu(tiny_llama):
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with offloaded(policy, enabled=True):
        assert next(policy.parameters()).device.type == "cpu"
    assert next(policy.parameters()).device.type == "cpu"


def test_one_line_errors(monkeypatch, tiny_llama, prompts, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as in an environment without the extra
    with pytest.raises(ConfigError, match=r'vLLM is not installed: pip install -e "\.\[vllm\]"'):
        EngineProcess(tiny_llama, {})
    for kwargs, message in [({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in"),
                            ({"lora": "adapter"}, "lora must be one of"),
                            ({"max_model_len": 64, "max_new_tokens": 64}, "max_model_len \\(64\\) must exceed"),
                            ({"temperature": 0}, "temperature must be > 0"),
                            ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an integer"),
                            ({"bucket_mib": 0}, "bucket_mib must be an integer >= 1")]:
        with pytest.raises(ConfigError, match=message):
            VLLMGenerator(**kwargs)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(ConfigError, match=r"cannot sample this policy in memory \(live: false samples a per-iteration"):
        VLLMGenerator(live=False).sample(model, tokenizer, prompts, 2, 0, DistContext())
    with pytest.raises(ConfigError, match=r'VLLMGenerator: vLLM is not installed'):  # live: an engine is needed
        VLLMGenerator().sample(model, tokenizer, prompts, 2, 0, DistContext())


def test_per_step_methods_take_the_live_engine_and_refuse_the_per_iteration_one():
    from sppo_lightning.methods import JBOND, OnlinePairs

    judge = FunctionJudge("sppo_lightning.ranking.judges:shorter")
    for method in (JBOND, OnlinePairs):
        method(judge, generator=VLLMGenerator())  # live: follows the weights in memory
        with pytest.raises(ConfigError, match="VLLMGenerator with live: false samples from an export"):
            method(judge, generator=VLLMGenerator(live=False))


def test_the_win_rate_of_a_vllm_run_samples_with_the_engines_settings():
    from sppo_lightning.callbacks.win_rate import evaluation_generator

    live = VLLMGenerator()
    assert evaluation_generator(live) is live  # a live engine samples the win rate too
    evaluation = evaluation_generator(VLLMGenerator(temperature=0.5, top_p=0.8, max_new_tokens=7, batch_size=3,
                                                    live=False))
    assert isinstance(evaluation, HFGenerator)
    assert (evaluation.temperature, evaluation.top_p, evaluation.max_new_tokens, evaluation.batch_size) == (0.5, 0.8, 7, 3)
    plain = HFGenerator(temperature=0.3)
    assert evaluation_generator(plain) is plain


def test_engine_reason_quotes_the_innermost_cause_on_one_line():
    try:
        try:
            raise RuntimeError("Unsupported CPU attention configuration: head_dim=16 isa=1")
        except RuntimeError as inner:
            raise ValueError("engine core initialisation failed") from inner
    except ValueError as error:
        assert engine_reason(error) == "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=1"
    error = ValueError("1 validation error for VllmConfig\n  Value error, bad int: '1.0' [type=value_error, "
                       "input_value=ArgsKwargs(...)]\n    For further information visit https://errors.pydantic.dev")
    assert engine_reason(error) == "ValueError: Value error, bad int: '1.0'"


def test_live_weights_are_the_merged_checkpoint_and_name_the_active_adapter(tiny_llama):
    """What a live engine is fed (no vLLM needed): the state dict merge_and_unload gives, under the
    checkpoint's names; the identity tells the policy, its anchor adapter and the adapters-off base apart."""
    from sppo_lightning.pipeline.live_weights import policy_weights, weights_identity

    torch.manual_seed(0)
    base = load_causal_lm(tiny_llama)
    assert dict(policy_weights(base)).keys() == base.state_dict().keys()
    policy = add_lora(base, LoraSettings(r=4, alpha=8, extra={"init_lora_weights": False}))
    policy.add_adapter("anchor", copy.deepcopy(policy.peft_config["default"]))
    policy.set_adapter("default")
    merged = copy.deepcopy(policy).merge_and_unload(adapter_names=["default"]).state_dict()
    streamed = dict(policy_weights(policy))
    assert streamed.keys() == merged.keys()
    for name, value in merged.items():
        torch.testing.assert_close(streamed[name], value, rtol=0, atol=0)
    own = weights_identity(policy)
    policy.set_adapter("anchor")
    anchor = weights_identity(policy)
    assert anchor != own and any(not torch.equal(dict(policy_weights(policy))[n], merged[n]) for n in merged)
    policy.set_adapter("default")
    with policy.disable_adapter():
        off = weights_identity(policy)
        plain = dict(policy_weights(policy))
    assert len({own, anchor, off}) == 3 and weights_identity(policy) == own
    for name, value in load_causal_lm(tiny_llama).state_dict().items():
        torch.testing.assert_close(plain[name], value, rtol=0, atol=0)  # adapters off: the base itself


def test_a_live_engine_starts_without_weights():
    kwargs, _ = VLLMGenerator().engine_settings(None, DistContext())
    assert kwargs["load_format"] == "dummy" and "enable_lora" not in kwargs


class CallRecorder:
    """Stands in for the engine process where vLLM cannot run the call under test: vLLM's CPU build has
    no sleep mode. It records what the generator asks of the engine, in order."""

    alive = True

    def __init__(self) -> None:
        self.calls = []

    def sleep(self, level):
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags):
        self.calls.append("wake " + "+".join(tags))

    def load_weights(self, tensors, bucket_bytes):
        assert next(iter(tensors))  # the weights are there to be sent
        self.calls.append("load")

    def generate(self, requests, lora, on_progress=None):
        self.calls.append("generate")
        return [[1] for _ in requests]

    def close(self):
        self.calls.append("close")


@pytest.mark.parametrize("level,expected", [
    # level 2 drops the weights: the same π is sent again after waking the weights' memory
    (2, ["load", "generate", "sleep 2", "wake weights", "load", "wake kv_cache", "generate", "sleep 2",
         "wake weights", "load", "wake kv_cache", "generate", "sleep 2"]),
    # level 1 keeps them in host memory: only a changed π is sent
    (1, ["load", "generate", "sleep 1", "wake weights", "wake kv_cache", "generate", "sleep 1",
         "wake weights", "load", "wake kv_cache", "generate", "sleep 1"]),
    (0, ["load", "generate", "generate", "load", "generate"]),
])
def test_on_cuda_a_live_engine_sleeps_between_samples(tiny_llama, tokenizer, prompts, level, expected):
    """Sample, sample the same π again, change π and sample: the calls a CUDA rank makes (nothing runs
    on a device: the engine is the recorder above). The weights' memory wakes before the new weights
    are loaded into it, the KV cache after; on CPU the engine never sleeps."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cuda, cpu = DistContext(device=torch.device("cuda", 0)), DistContext()
    generator = VLLMGenerator(sleep_level=level, max_new_tokens=4, show_progress=False)
    assert generator.engine_settings(None, cuda)[0].get("enable_sleep_mode", False) is (level > 0)
    assert "enable_sleep_mode" not in generator.engine_settings(None, cpu)[0]
    never_sleeps = ["load", "generate", "generate", "load", "generate"]
    for ctx, calls in ((cuda, expected), (cpu, never_sleeps)):
        generator = VLLMGenerator(sleep_level=level, max_new_tokens=4, show_progress=False)
        generator._engine, generator._engine_key = CallRecorder(), ("live",)  # as a started engine
        for step in range(3):
            if step == 2:
                with torch.no_grad():
                    next(model.parameters()).add_(1e-3)  # π changed
            generator.sample(model, tokenizer, prompts, 2, 0, ctx)
        assert generator._engine.calls == calls, ctx
    with pytest.raises(ConfigError, match="sleep_level must be 0, 1 or 2"):
        VLLMGenerator(sleep_level=3)
