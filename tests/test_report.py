"""The run report: losses survive restarts and torn lines, the markdown table, plots without data."""

import json

from sppo_lightning.report import markdown, read_losses, write_report


def test_losses_keep_the_last_record_of_a_replayed_step_and_skip_a_torn_line(tmp_path):
    path = tmp_path / "losses.jsonl"
    rows = [{"step": 1, "iteration": 0, "loss": 3.0}, {"step": 2, "iteration": 0, "loss": 2.0},
            {"step": 2, "iteration": 0, "loss": 2.5}, {"step": 3, "iteration": 1, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "itera')
    assert read_losses(path) == {1: (0, 3.0), 2: (0, 2.5), 3: (1, 1.0)}


def test_markdown_row_per_iteration_and_where_things_are():
    rows = [{"iteration": 1, "win_rate_vs_initial": 0.6123, "pairs": 10, "ties_dropped": 2, "prompts_truncated": 1,
             "chosen_p_win": 0.8, "rejected_p_win": 0.25, "final_loss": 12.5,
             "seconds": {"generate": 1.25, "rank": 0.5, "reference": 0.2, "train": 3.0, "evaluate": 0.75}},
            {"iteration": 2, "pairs": 9, "final_loss": None, "seconds": {}}]
    text = markdown(rows, {"checkpoints": "/runs/x/checkpoints"})
    lines = text.splitlines()
    assert "| 1 | 0.612 | 10 | 2 | 1 | 0.800 / 0.250 | 12.5 | 1.2s | 0.5s | 0.2s | 3.0s | 0.8s |" in lines
    assert "| 2 | - | 9 | 0 | 0 | - | - | - | - | - | - | - |" in lines
    assert "- checkpoints: `/runs/x/checkpoints`" in lines


def test_report_without_eval_prompts_or_pairs_still_writes_every_file(tmp_path):
    paths = write_report(tmp_path, [{"iteration": 1, "pairs": 0, "seconds": {}}], {})
    for name in ("win_rate", "p_win", "loss"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
    assert paths["report"].read_text().startswith("# Self-play run report")


def test_plots_go_to_loggers_that_take_images(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from sppo_lightning.report import log_images

    class ImageLogger(CSVLogger):  # the W&B / Neptune interface: log_image(key, images, step)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.images = []

        def log_image(self, key, images, step=None):
            self.images.append((key, images, step))

    paths = write_report(tmp_path, [{"iteration": 1, "win_rate_vs_initial": 0.7, "seconds": {}}], {})
    image_logger, plain = ImageLogger(tmp_path), CSVLogger(tmp_path)
    log_images([image_logger, plain], paths, step=5)
    assert [key for key, _, _ in image_logger.images] == ["self_play/win_rate", "self_play/p_win", "self_play/loss"]
    assert all(step == 5 and images == [str(paths[key.split("/")[1]])] for key, images, step in image_logger.images)


def test_sppo_gaps_are_read_and_plotted_beside_the_loss(tmp_path):
    from sppo_lightning.report import read_gaps

    rows = [{"step": 1, "iteration": 0, "loss": 9e4, "gap": 300.0}, {"step": 2, "iteration": 0, "loss": 8e4},
            {"step": 3, "iteration": 1, "loss": 1e5, "gap": 310.5}]
    (tmp_path / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_gaps(tmp_path / "losses.jsonl") == {1: 300.0, 3: 310.5}
    paths = write_report(tmp_path, [{"iteration": 1, "win_rate_vs_initial": 0.965, "seconds": {}}], {})
    assert paths["loss"].read_bytes()[:4] == b"\x89PNG"


def test_a_pair_run_summary_keeps_the_loss_its_settings_and_the_last_metrics(tmp_path):
    import json

    from sppo_lightning.pair_summary import pair_summary, write_pair_summary

    summary = pair_summary({"loss": "dpo", "beta": 0.1, "lora": {"r": 4}, "_class_path": "x", "odd": object()},
                           {"train/loss": 0.61, "val/loss": float("nan"), "epoch": 1.0}, steps=12, epochs=2)
    assert summary == {"loss": "dpo", "settings": {"loss": "dpo", "beta": 0.1, "lora": {"r": 4}}, "steps": 12,
                       "epochs": 2, "metrics": {"train/loss": 0.61, "val/loss": None}}
    path, line = write_pair_summary(tmp_path, summary)
    assert json.loads(path.read_text()) == summary
    assert line == f"pair run | loss dpo | 12 steps, 2 epoch(s) | train/loss 0.61 (summary, with every setting: {path})"


def test_the_report_names_the_method_ranker_and_generator():
    setup = {"method": "SPPO", "ranker": {"class": "FunctionJudge", "function": "m:f", "source": "x" * 64},
             "generator": {"class": "HFGenerator", "temperature": 0.7, "top_p": 0.9, "stop": [1, 2]}}
    lines = markdown([], {}, setup=setup).splitlines()
    assert lines[2:5] == ["- method: SPPO", f"- ranker: FunctionJudge (function m:f, source {'x' * 47}…)",
                          "- generator: HFGenerator (temperature 0.7, top_p 0.9)"]
    assert not any(line.startswith("- method") for line in markdown([], {}).splitlines())
