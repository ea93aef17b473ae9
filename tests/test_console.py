"""A quiet console by default, labelled progress bars, and --verbose to bring the third-party lines
back (real CLI runs)."""

import re
import subprocess
import sys

import pytest

from sppo_lightning.console import LOG_LINES
from sppo_lightning.progress import epoch_description
from tests.helpers import quickstart, run_fit

NOISE = ["💡 Tip", "Failed to load CPU gemm_4bit_forward", "LeafSpec", "module(s) in eval mode",
         "does not have many workers", "Total length of", "Trying to infer the `batch_size`"]


def test_a_run_prints_no_known_noise_and_verbose_brings_it_back(tiny_dir, tmp_path):
    quiet = run_fit(quickstart(tmp_path), tiny_dir, tmp_path)
    output = quiet.stdout + quiet.stderr
    assert [line for line in NOISE if line in output] == []
    assert "iteration 1 | win rate vs initial" in output  # our own lines stay
    epochs = [(int(e), int(total)) for e, total in re.findall(r"Epoch (\d+)/(\d+)", output)]
    assert epochs and max(epochs) == (epochs[0][1], epochs[0][1])  # the last epoch reads n/n: counted from 1
    assert all(1 <= e <= total for e, total in epochs)
    for label in ("sampling", "judging", "reference log-probs", "evaluating (win rate vs initial)"):
        assert f"{label}: 100%" in output, label  # every long stage has its own labelled progress bar
    loud = run_fit(quickstart(tmp_path), tiny_dir, tmp_path, "--verbose")
    output = loud.stdout + loud.stderr
    assert "💡 Tip" in output
    assert {start for _, start, _ in LOG_LINES} == {"💡 Tip:", "Failed to load CPU gemm_4bit_forward"}


IMPORT_BNB = "import sys; from sppo_lightning import console; {} import bitsandbytes"


@pytest.mark.parametrize("quiet", [True, False])
def test_the_bitsandbytes_kernel_line_is_hidden_only_when_quiet(quiet):
    # Whether a run imports bitsandbytes at all depends on peft's version (0.22 stopped importing it
    # with peft), so its line is checked on a real import of bitsandbytes, with the filter and without.
    from bitsandbytes.functional import has_avx512bf16

    code = IMPORT_BNB.format("console.quiet();" if quiet else "")
    stderr = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    # bitsandbytes asks for its optional kernels only on CPUs with AVX-512 BF16 (this project's machines)
    expected = has_avx512bf16() and not quiet
    assert ("Failed to load CPU gemm_4bit_forward" in stderr) == bool(expected), stderr


def test_the_progress_bar_counts_epochs_from_one():
    assert epoch_description(0, 3) == "Epoch 1/3" and epoch_description(2, 3) == "Epoch 3/3"
    assert epoch_description(4, -1) == "Epoch 5" and epoch_description(0, None) == "Epoch 1"


def test_loading_pairrm_prints_nothing_of_its_own(tiny_dir):
    """llm-blender's config warnings and transformers' embedding-resize line are removed at their
    source (not filtered), so a plain Python process loading PairRM stays quiet too."""
    code = (f"from sppo_lightning.ranking import PairRMRanker; "
            f"print(PairRMRanker({str(tiny_dir / 'pairrm')!r}, device='cpu', show_progress=False)"
            f".pairwise_logits(['hi'], [['a', 'b']]).shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "torch.Size([1, 2, 2])"
    assert "RankerConfig" not in result.stderr and "multivariate normal" not in result.stderr, result.stderr
