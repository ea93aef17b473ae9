"""End to end through the real `sppo-lightning` console script, on the tiny offline model."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tests.helpers import fit_pairs as fit, run_cli as run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("sppo-lightning")


def test_fit_exports_a_model_that_transformers_loads(tmp_path, tiny_llama):
    fit(tmp_path, tiny_llama, "--trainer.max_epochs", "1")
    run_dir = tmp_path / "lightning_logs" / "version_0"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    for key in ("train/loss", "train/rewards/margins", "train/rewards/accuracy", "train/logps/chosen",
                "train/targets/chosen", "val/loss"):
        assert key in logged, key

    exported = tmp_path / "hf_model"  # under the root: one place per run, resumed or not
    assert (exported / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 2?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    # training moved the weights away from the initial model
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(model.model.embed_tokens.weight, initial.model.embed_tokens.weight)

    # the export command writes the same weights from the checkpoint, into a folder (a file is refused)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"  # the recipe's ModelCheckpoint (save_last) under the root
    (tmp_path / "a_file").write_text("not a folder")
    refused = run("export", ckpt, tmp_path / "a_file", check=False)
    assert refused.returncode == 2 and "Exported" not in refused.stdout
    assert refused.stderr.strip().splitlines()[-1] == (f"sppo-lightning: error: {tmp_path / 'a_file'} is a file, not a "
                                                       f"folder: give export a folder to write the model into")
    run("export", ckpt, tmp_path / "exported")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name

    # validate and test run from the same config
    result = fit(tmp_path, tiny_llama, "--ckpt_path", ckpt, subcommand="test")
    assert "test/loss" in result.stdout


def test_lora_fit_exports_merged_weights(tmp_path, tiny_llama):
    fit(tmp_path, tiny_llama, "--trainer.max_epochs", "1", "--model.loss", "dpo", "--model.lr", "0.05",
        "--model.lora", "{r: 4, alpha: 8}")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model").eval()
    assert not any("lora" in k for k in merged.state_dict())

    from sppo_lightning.export import _load_for_export

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    module = _load_for_export(str(ckpt))
    ids = torch.tensor([[1, 5, 40, 41, 42, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, module.policy.eval()(ids).logits, atol=1e-5, rtol=1e-5)
        with module.policy.disable_adapter():
            base = module.policy(ids).logits
    assert not torch.allclose(merged(ids).logits, base, atol=1e-4), "the adapters trained nothing"


@pytest.mark.parametrize(
    "override, message",
    [
        (("--data.init_args.train_data", "configs/data/missing.jsonl"), "configs/data/missing.jsonl: no such file"),
        (("--model.eta", "-1"), "model.eta must be > 0"),
        (("--model.loss", "asft", "--model.reference", "copy"), "reference-free loss 'asft'"),
        (("--data.init_args.max_prompt_length", "500"), "max_prompt_length (500) must be smaller"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, tiny_llama, override, message):
    result = fit(tmp_path, tiny_llama, *override, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_row_in_data_file_names_file_row_and_column(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    lines = (REPO / "configs/data/tiny_preferences.jsonl").read_text().splitlines()[:3]
    lines[2] = lines[2].replace('"chosen_probs_win": 0.', '"chosen_probs_win": 7.')
    bad.write_text("\n".join(lines) + "\n")
    result = fit(tmp_path, tiny_llama, "--data.init_args.train_data", bad, check=False)
    assert result.returncode == 2
    assert f"{bad}: row 3: column 'chosen_probs_win': 7." in result.stderr


@pytest.mark.parametrize("recipe, keys", [
    ("asft", ["train/nll", "train/alignment", "train/prob/chosen", "train/prob/rejected", "train/accuracy"]),
    ("orpo", ["train/nll", "train/alignment"]),
    ("dpo", ["train/rewards/margins", "train/rewards/accuracy"]),
    ("ipo", ["train/rewards/margins"]),
    ("simpo", ["train/rewards/margins", "train/rewards/accuracy"]),
])
def test_pair_recipes_run_on_the_tiny_model(tmp_path, tiny_llama, recipe, keys):
    """configs/dpo.yaml with configs/losses/<recipe>.yaml as shipped, only the model, data and hardware made tiny."""
    layer = [] if recipe == "dpo" else ["--config", f"configs/losses/{recipe}.yaml"]
    run(
        "fit", "--config", "configs/dpo.yaml", *layer, "--model.model_name_or_path", tiny_llama,
        "--model.torch_dtype", "float32", "--model.gradient_checkpointing", "false", "--model.lr", "1e-3",
        "--data.train_data", "configs/data/tiny_preferences.jsonl",
        "--data.eval_data", "configs/data/tiny_preferences_eval.jsonl", "--data.max_length", "128",
        "--data.max_prompt_length", "64", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.precision", "32-true", "--trainer.default_root_dir", tmp_path,
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", tmp_path,
        "--trainer.log_every_n_steps", "1",
    )
    run_dir = tmp_path / "lightning_logs" / "version_0"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    for key in keys + ["train/loss", "val/loss"]:
        assert key in logged, key
    assert (tmp_path / "hf_model" / "model.safetensors").exists()


@pytest.mark.parametrize("loss", [None, "simpo"])
def test_own_pairs_need_only_the_data_file(tmp_path, tiny_llama, loss):
    """configs/pairs.yaml with the user's file as its one override (the hub model swapped for the
    tiny one, and the outputs sent to a tmp folder, since tests reach no hub and write only there);
    any loss is one more flag. Every output lands under trainer.default_root_dir."""
    extra = ["--model.loss", loss] if loss else []
    run("fit", "--config", "configs/pairs.yaml", "--data.train_data", "configs/data/tiny_preferences.jsonl",
        "--model.model_name_or_path", tiny_llama, "--trainer.default_root_dir", tmp_path, *extra)
    version = tmp_path / "lightning_logs" / "version_0"
    assert (version / "metrics.csv").exists() and (tmp_path / "hf_model" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_pairs_without_a_data_file_is_one_line(tmp_path, tiny_llama):
    result = run("fit", "--config", "configs/pairs.yaml", "--model.model_name_or_path", tiny_llama,
                 "--trainer.default_root_dir", tmp_path, check=False)
    assert result.returncode == 2 and "data.train_data is not set" in result.stderr


def lightning_imported_by(*args: str) -> bool:
    """Whether ``sppo-lightning <args>`` imports Lightning (what makes an answer take seconds): the
    speed of help is checked by what it loads, not by a wall time that a busy machine stretches."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom sppo_lightning.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    main({list(args)!r})\n"
            "print('lightning' in sys.modules or 'lightning.pytorch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1] == "True"


def test_top_level_help_names_the_tool_and_every_command_fast():
    for args in (["--help"], []):
        assert not lightning_imported_by(*args)  # answers at once
        result = run(*args)
        out = result.stdout
        assert out.startswith("usage: sppo-lightning <command>") and "Lightning Trainer command line tool" not in out
        for command in ("fit", "validate", "export", "generate", "judge", "--verbose"):
            assert command in out, command


def test_fit_help_is_rendered_once_then_answers_from_the_cache_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPO_LIGHTNING_CACHE", str(tmp_path / "cache"))
    first = run("fit", "--help").stdout
    assert "--model.help PreferenceModule" in " ".join(first.split()) and "--trainer.max_epochs" in first
    (cached,) = (tmp_path / "cache").glob("help-fit-*.txt")
    assert not lightning_imported_by("fit", "--help")  # read from the cache, Lightning not loaded
    again = run("fit", "--help").stdout
    assert again == first
    cached.write_text("stale\n")  # the cache is what answers
    assert run("fit", "--help").stdout == "stale\n"
    assert run("validate", "-h").stdout.startswith("usage:")  # each loop its own entry


def test_every_help_request_is_rendered_once_then_answers_from_the_cache(tmp_path, monkeypatch):
    """``--X.help`` and each command's ``--help``, not only ``fit --help``: the second call reads the
    text (Lightning not loaded); a request that fails is not kept; a config file is never cached."""
    from sppo_lightning.cli import is_help_request

    monkeypatch.setenv("SPPO_LIGHTNING_CACHE", str(tmp_path / "cache"))
    for args in (("fit", "--model.help", "PreferenceModule"), ("generate", "--help"), ("export", "-h")):
        first = run(*args).stdout
        assert first.startswith("usage:") or "--model.loss" in first, args
        assert not lightning_imported_by(*args), args
        assert run(*args).stdout == first, args
    assert len(list((tmp_path / "cache").glob("help-*.txt"))) == 3
    failed = run("fit", "--model.help", "NoSuchModule", check=False)
    assert failed.returncode != 0 and len(list((tmp_path / "cache").glob("help-*.txt"))) == 3
    assert not is_help_request(["fit", "--config", "c.yaml", "--help"]) and is_help_request(["fit", "--data.help", "X"])


def test_fit_help_points_at_our_settings_and_those_commands_work():
    assert "--model.help PreferenceModule" in " ".join(run("fit", "--help").stdout.split())
    for flag, target, key in [
        ("--model.help", "PreferenceModule", "--model.loss"),
        ("--model.help", "sppo_lightning.bond.BondModule", "--model.gamma"),
        ("--data.help", "sppo_lightning.datamodules.SelfPlayDataModule", "--data.prompts_per_iteration"),
    ]:
        assert key in run("fit", flag, target).stdout, (flag, target)
    # a method's keys (K, the generator, the ranker) once the data module is named, and the boundary's
    method = run("fit", "--data", "sppo_lightning.datamodules.SelfPlayDataModule", "--data.method.help",
                 "sppo_lightning.methods.SPPO").stdout
    # nested help names its flags as they are typed, not from their last part
    assert "--data.method.num_samples" in method and "--data.method.generator" in method
    assert "--data.method.ranker" in method and " --method." not in method
    assert "--self_play.eval_samples" in run("fit", "--help").stdout


def test_a_small_pair_run_logs_its_loss(tmp_path, tiny_llama):
    """20 rows in batches of 4 (5 batches) with log_every_n_steps 10: the interval is clamped to the
    epoch's batches, said in one line, and metrics.csv holds the loss."""
    rows = (REPO / "configs" / "data" / "tiny_preferences.jsonl").read_text().splitlines()[:20]
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(rows) + "\n")
    result = fit(tmp_path, tiny_llama, "--trainer.max_epochs", "1", "--data.train_data", data,
                 "--data.eval_data", "null", "--data.batch_size", "4", "--trainer.log_every_n_steps", "10")
    assert "trainer.log_every_n_steps 10 is more than an epoch's 5 batch(es): logging every 5" in result.stderr
    assert "smaller than the logging interval" not in result.stderr  # Lightning's own warning is not needed
    rows = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open()))
    assert [r["step"] for r in rows if r.get("train/loss")] == ["4"]
    # the run's folder names its loss and settings in one file, and the console says where
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loss"] == "sppo" and summary["steps"] == 5 and summary["epochs"] == 1
    assert summary["settings"]["eta"] == 1000.0 and summary["settings"]["model_name_or_path"] == tiny_llama
    assert summary["metrics"]["train/loss"] == pytest.approx(float(rows[-1]["train/loss"]))
    assert "pair run | loss sppo | 5 steps, 1 epoch(s) | train/loss " in result.stderr
    assert f"(summary, with every setting: {tmp_path / 'summary.json'})" in result.stderr


def test_key_typos_and_yaml_errors_name_the_file_and_the_key_meant(tmp_path):
    import yaml

    quickstart = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    quickstart["data"]["init_args"]["method"]["init_args"]["num_sample"] = 3
    quickstart["model"]["init_args"]["etta"] = 100.0
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(quickstart))
    line = run("fit", "--config", typo, check=False).stderr.strip().splitlines()[-1]
    assert line.startswith("sppo-lightning: error: ") and f"(in {typo}); did you mean `" in line, line
    assert "did you mean `num_samples`?" in line or "did you mean `eta`?" in line, line
    flag = run("fit", "--config", "configs/quickstart.yaml", "--data.method.num_sample", "3", check=False)
    assert ("data.method: Option 'num_sample' is not accepted (on the command line); did you mean `num_samples`?"
            in flag.stderr), flag.stderr[-2000:]
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  init_args: [\n   x: : y\n")
    result = run("fit", "--config", broken, check=False)
    assert result.returncode == 2 and f"in {broken}, line 3" in result.stderr and "<unicode string>" not in result.stderr


def test_an_empty_config_is_named_and_config_errors_come_before_the_heavy_imports(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    result = run("fit", "--config", empty, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"sppo-lightning: error: {empty} is empty (or only comments): a config sets at least model: and data: "
        f"(see configs/quickstart.yaml, or `sppo-lightning fit --help`)")
    # A config error is found by the parser alone: no model class, peft or bitsandbytes is loaded first
    # (they cost seconds; README: a config error in about 4.5 s).
    probe = ("import sys\nfrom sppo_lightning.cli import main\n"
             "try:\n    main(['fit', '--config', 'configs/quickstart.yaml', '--model.eta', 'abc'])\n"
             "except SystemExit as e:\n    assert e.code == 2\n"
             "print(sorted(m for m in ('peft', 'bitsandbytes', 'transformers.optimization', "
             "'transformers.models.llama.modeling_llama') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "model.eta: Expected a <class 'float'>" in out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_negative_numbers_parse_as_users_type_them():
    from sppo_lightning.cli import join_negative_values

    assert join_negative_values(["fit", "--model.lr", "-1e-3", "--a", "-2", "--b", "-x", "--c=-1"]) == \
        ["fit", "--model.lr=-1e-3", "--a=-2", "--b", "-x", "--c=-1"]
    printed = run("fit", "--config", "configs/tiny_pairs.yaml", "--model.init_args.lr", "-1e-3",
                  "--model.init_args.weight_decay", "-2.5E-1", "--print_config").stdout
    assert "  lr: -0.001" in printed and "  weight_decay: -0.25" in printed


def test_short_class_names_are_accepted_where_unambiguous():
    import importlib

    from sppo_lightning.cli import SHORT_NAMES, expand_short_names

    for name, path in SHORT_NAMES.items():  # each resolves to the class of that name
        module, _, attribute = path.rpartition(".")
        assert getattr(importlib.import_module(module), attribute).__name__ == name
    assert expand_short_names(["fit", "--data", "SelfPlayDataModule", "--data.method=SPPO", "--data.method.ranker.help",
                               "PairRMRanker", "--model.lr", "SPPO"]) == \
        ["fit", "--data", "sppo_lightning.datamodules.SelfPlayDataModule", "--data.method=sppo_lightning.methods.SPPO",
         "--data.method.ranker.help", "sppo_lightning.ranking.PairRMRanker", "--model.lr", "SPPO"]
    ranker = run("fit", "--data", "SelfPlayDataModule", "--data.method", "SPPO", "--data.method.ranker.help",
                 "VerifiableInstructionRanker").stdout
    assert "--data.method.ranker.length_penalty" in ranker
