"""The README's main job, end to end through the real CLI: 3 SPPO iterations on the tiny models."""

import json

import yaml
from tests.helpers import REPO, run_fit


def test_quickstart_win_rate_rises_every_iteration(tiny_dir, tmp_path):
    result = run_fit(REPO / "configs" / "quickstart.yaml", tiny_dir, tmp_path)
    summary = json.loads((tmp_path / "self_play" / "summary.json").read_text())["iterations"]
    win_rates = [row["win_rate_vs_initial"] for row in summary]
    assert [row["iteration"] for row in summary] == [1, 2, 3]
    assert win_rates == sorted(win_rates) and len(set(win_rates)) == 3, win_rates  # strictly rising
    assert win_rates[0] > 0.5
    # The README's example summary has this run's shape: its digits vary by CPU and library version
    # (another machine printed 0.617 / 0.844 / 0.988), so they are shown "for example", not checked.
    import re

    readme = (REPO / "README.md").read_text()
    shown = re.findall(r"^iteration (\d) \| win rate vs initial ([\d.]+) \| p_win chosen ([\d.]+) / rejected ([\d.]+) "
                       r"\| pairs (\d+)", readme, flags=re.M)[:3]
    assert [int(i) for i, *_ in shown] == [1, 2, 3], shown
    assert [float(w) for _, w, *_ in shown] == sorted(float(w) for _, w, *_ in shown)  # rising, as here
    assert all(float(c) > 0.5 > float(r) and int(p) <= 64 for _, _, c, r, p in shown)
    for row in summary:
        assert row["pairs"] <= 64
        assert row["chosen_p_win"] > 0.5 > row["rejected_p_win"]
        assert row["final_loss"] is not None
        assert set(row["seconds"]) >= {"generate", "rank", "reference", "train"}
    assert "Self-play summary" in result.stderr + result.stdout
    assert (tmp_path / "hf_model" / "model.safetensors").exists()
    # The report: plots and markdown in the run dir, and the output points to them.
    run_dir = tmp_path / "self_play"
    for name in ("win_rate.png", "p_win.png", "loss.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert str(run_dir / name) in result.stderr + result.stdout
    report = (run_dir / "report.md").read_text()
    assert str(run_dir / "report.md") in result.stderr + result.stdout
    rows = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[1] for row in rows] == [f"{w:.3f}" for w in win_rates]
    assert str(tmp_path / "checkpoints") in report and "hf_model" in report
    # What made the run is named in the manifest, the summary and the report.
    saved = json.loads((run_dir / "summary.json").read_text())["setup"]
    manifest = json.loads((run_dir / "iteration_3" / "manifest.json").read_text())["plugins"]
    assert saved == manifest and saved["method"] == "SPPO"
    assert saved["ranker"]["class"] == "FunctionJudge" and saved["generator"]["class"] == "HFGenerator"
    assert "- ranker: FunctionJudge (function sppo_lightning.ranking.judges:positive_words" in report
    assert "- generator: HFGenerator (temperature 0.7, top_p 0.9" in report
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in losses] == sorted(r["iteration"] for r in losses) and {r["iteration"] for r in losses} == {1, 2, 3}


def test_quickstart_with_pairrm_instead_of_the_judge(tiny_dir, tmp_path):
    """Switching the oracle is one config block: here the tiny PairRM in llm-blender's layout."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["data"]["init_args"]["method"]["init_args"]["ranker"] = {
        "class_path": "sppo_lightning.ranking.PairRMRanker",
        "init_args": {"path": str(tiny_dir / "pairrm"), "device": "cpu"},
    }
    config["trainer"]["max_epochs"] = 1
    path = tmp_path / "pairrm_source.yaml"
    path.write_text(yaml.safe_dump(config))
    run_fit(path, tiny_dir, tmp_path)
    manifest = json.loads((tmp_path / "self_play" / "iteration_1" / "manifest.json").read_text())
    from sppo_lightning.ranking import PairRMRanker, fingerprint_of
    from sppo_lightning.ranking.protocol import fingerprint_hash

    # the rankings record the ranker's identity: another checkpoint or setting redoes them on resume
    ranker = PairRMRanker(str(tiny_dir / "pairrm"), device="cpu")
    assert manifest["stages"]["rankings"]["input"]["ranker"] == fingerprint_hash(fingerprint_of(ranker))
    assert manifest["stages"]["train"]["rows"] > 0
