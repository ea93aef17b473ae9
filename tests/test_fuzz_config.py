"""Hypothesis feeds the real CLI broken configs: unknown keys, wrong types, impossible combinations,
missing paths. Every case either runs (set-up only: max_steps 0) or ends in one line,
`sppo-lightning: error: ...` with exit code 2: never a traceback, never the usage wall."""

import contextlib
import copy
import io
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sppo_lightning.cli import main
from tests.helpers import REPO

EXAMPLES = 40  # recorded in the README

BASE = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
# Small, so that the configs that are valid set up quickly (they generate iteration 0's data).
BASE["data"]["init_args"].update(prompts_per_iteration=4, eval_prompts=None)
BASE["data"]["init_args"]["method"]["init_args"].update(num_samples=2)
BASE["data"]["init_args"]["method"]["init_args"]["generator"]["init_args"].update(max_new_tokens=4)
SECTIONS = [("model", "init_args"), ("data", "init_args"), ("trainer",),
            ("data", "init_args", "method", "init_args"), ("self_play",)]
WRONG_VALUES = st.one_of(
    st.text(max_size=12), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.none(), st.booleans(),
)
IMPOSSIBLE = [
    ("data.init_args.method.init_args.num_samples", 1),
    ("model.init_args.eta", 0.0),
    ("model.init_args.eta", -3.0),
    ("model.init_args.loss", "asft", "model.init_args.reference", "copy"),
    ("model.init_args.footprint", "fsdp"),  # with the default single-device strategy
    ("model.init_args.footprint", "qlora", "model.init_args.reference", "copy"),
    ("model.init_args.lora", {"target_modules": ["query_key_value"]}),
    ("data.init_args.prompts", "/no/such/prompts.jsonl"),
    ("model.init_args.model_name_or_path", "/no/such/model"),
    ("data.init_args.max_prompt_length", 0),
    ("data.init_args.method.init_args.generator.init_args.top_p", 1.5),
    ("trainer.devices", 0),
    ("trainer.devices", "two"),
    ("trainer.max_epochs", -2),
    ("model.init_args.optimizer", None),
    ("data.init_args.batch_size", None),
]


def _get(config, path):
    node = config
    for key in path:
        node = node[key]
    return node


def _set(config, dotted, value):
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    _get(config, keys[:-1])[keys[-1]] = value


@st.composite
def broken_configs(draw):
    config = copy.deepcopy(BASE)
    kind = draw(st.sampled_from(["unknown_key", "wrong_type", "impossible"]))
    if kind == "impossible":
        case = draw(st.sampled_from(IMPOSSIBLE))
        for key, value in zip(case[::2], case[1::2]):
            _set(config, key, value)
        return config
    section = _get(config, draw(st.sampled_from(SECTIONS)))
    if kind == "unknown_key":  # (an unknown key is never a valid multi-process setting)
        unknown = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(lambda k: k not in section)
        section[draw(unknown)] = draw(WRONG_VALUES)
    else:
        # Not devices / num_nodes / strategy: a valid multi-process value would make Lightning
        # relaunch this pytest process as DDP workers. Their bad values are in IMPOSSIBLE.
        keys = [k for k in section if k not in ("callbacks", "logger", "ranker", "generator", "method", "devices",
                                                "num_nodes", "strategy")]
        section[draw(st.sampled_from(keys))] = draw(WRONG_VALUES)
    return config


@pytest.fixture(scope="module")
def workdir(tiny_dir, tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_config"), tiny_dir


# derandomize: CI runs the same 40 cases every time; FUZZ_EXAMPLES=500 explores further (and randomly).
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", EXAMPLES)), deadline=None,
          derandomize="FUZZ_EXAMPLES" not in os.environ, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=broken_configs())
def test_broken_configs_end_in_one_line(workdir, config):
    import uuid

    root, tiny_dir = workdir
    out = root / uuid.uuid4().hex[:8]  # a run of its own: no run dir left by another example
    out.mkdir()
    config["model"]["init_args"]["model_name_or_path"] = config["model"]["init_args"].get(
        "model_name_or_path") if str(config["model"]["init_args"].get("model_name_or_path")).startswith("/no/") \
        else str(tiny_dir / "llama")
    trainer = config["trainer"] if isinstance(config.get("trainer"), dict) else {}
    if isinstance(trainer, dict):
        trainer["default_root_dir"] = str(out / "run")
        if isinstance(trainer.get("logger"), dict):
            trainer["logger"] = False
        for callback in trainer.get("callbacks") or []:
            if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
                callback["init_args"]["dirpath"] = str(out / "checkpoints")
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["fit", "--config", str(path), "--trainer.max_steps", "0", "--trainer.enable_progress_bar", "false"])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    text = stderr.getvalue()
    assert "Traceback" not in text and "usage:" not in text, text[-2000:]
    if code != 0:
        errors = [line for line in text.splitlines() if line.startswith("sppo-lightning: error:")]
        assert code == 2 and len(errors) == 1, text[-2000:]
        assert "Not a valid subclass" not in errors[0] and "Union subtypes" not in errors[0], errors[0]


def test_impossible_combinations_are_each_refused(workdir):
    """Every IMPOSSIBLE case, not just the ones hypothesis happens to draw, is an error."""
    out, tiny_dir = workdir
    for case in IMPOSSIBLE:
        config = copy.deepcopy(BASE)
        config["model"]["init_args"]["model_name_or_path"] = str(tiny_dir / "llama")
        config["trainer"].update(default_root_dir=str(out / "run"), logger=False)
        config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(out / "checkpoints")
        for key, value in zip(case[::2], case[1::2]):
            _set(config, key, value)
        path = out / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
                pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(path), "--trainer.max_steps", "0"])
        lines = [line for line in stderr.getvalue().splitlines() if line.startswith("sppo-lightning: error:")]
        assert exit_.value.code == 2 and len(lines) == 1, (case, stderr.getvalue()[-1500:])
