"""A quiet console by default, labelled progress bars, and --verbose to bring the third-party lines
back (real CLI runs)."""

from sppo_lightning.console import LOG_LINES
from tests.test_faults import quickstart
from tests.test_quickstart import run_fit

NOISE = ["💡 Tip", "Failed to load CPU gemm_4bit_forward", "LeafSpec", "module(s) in eval mode",
         "does not have many workers", "Total length of", "Trying to infer the `batch_size`"]


def test_a_run_prints_no_known_noise_and_verbose_brings_it_back(tiny_dir, tmp_path):
    quiet = run_fit(quickstart(tmp_path), tiny_dir, tmp_path)
    output = quiet.stdout + quiet.stderr
    assert [line for line in NOISE if line in output] == []
    assert "iteration 1 | win rate vs initial" in output  # our own lines stay
    for label in ("sampling", "judging", "reference log-probs", "evaluating (win rate vs initial)"):
        assert f"{label}: 100%" in output, label  # every long stage has its own labelled progress bar
    loud = run_fit(quickstart(tmp_path), tiny_dir, tmp_path, "--verbose")
    output = loud.stdout + loud.stderr
    from bitsandbytes.functional import has_avx512bf16

    assert "💡 Tip" in output
    # bitsandbytes asks for its optional kernels only on CPUs with AVX-512 BF16 (this project's machines)
    assert ("Failed to load CPU gemm_4bit_forward" in output) == has_avx512bf16()
    assert {start for _, start, _ in LOG_LINES} == {"💡 Tip:", "Failed to load CPU gemm_4bit_forward"}
