"""The run report people look at: plots and a markdown summary in the run directory.

Written by the ``SelfPlay`` boundary callback at the end of every iteration (rank 0), from what the run
already stored: ``summary.json`` rows, the per-step losses in ``losses.jsonl`` and the win
probabilities of each ``iteration_<t>/train.parquet``. Files:

- ``win_rate.png``: win rate of the policy against the initial one, per iteration;
- ``p_win.png``: the distribution of chosen and rejected P(win) per iteration;
- ``loss.png``: the training loss per step, iterations marked;
- ``report.md``: one table row per iteration (time per stage, pairs, ties dropped, prompts
  truncated, win rate) and where the checkpoints and exports are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from sppo_lightning.files import atomic_write_bytes

PLOTS = ("win_rate.png", "p_win.png", "loss.png")


def read_losses(path: Path) -> dict[int, tuple[int, float]]:
    """``{step: (iteration, loss)}`` from ``losses.jsonl``; a step replayed after a resume keeps
    its last record, and a line cut by a crash is ignored."""
    losses: dict[int, tuple[int, float]] = {}
    if not path.exists():
        return losses
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            losses[int(row["step"])] = (int(row["iteration"]), float(row["loss"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return losses


def read_gaps(path: Path) -> dict[int, float]:
    """``{step: mean |log-ratio − target|}`` from ``losses.jsonl`` (SPPO's losses record it)."""
    gaps: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                if "gap" in row:
                    gaps[int(row["step"])] = float(row["gap"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return gaps


def read_p_wins(run_dir: Path, iteration: int) -> Optional[tuple[list[float], list[float]]]:
    """Chosen and rejected P(win) of the training pairs of iteration ``iteration`` (counted from 1, as
    its folder), or None where there are none (not written yet, or a method without win probabilities)."""
    path = Path(run_dir) / f"iteration_{iteration}" / "train.parquet"
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    if not {"chosen_probs_win", "chosen_probs_lose"} <= set(pq.read_schema(path).names):
        return None

    table = pq.read_table(path, columns=["chosen_probs_win", "chosen_probs_lose"])
    return table.column("chosen_probs_win").to_pylist(), table.column("chosen_probs_lose").to_pylist()


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=100)
    return plt, figure, axis


def _save(plt, figure, path: Path) -> Path:
    import io

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_win_rate(rows: list[dict[str, Any]], path: Path) -> Path:
    plt, figure, axis = _figure()
    points = [(r["iteration"], r["win_rate_vs_initial"]) for r in rows if r.get("win_rate_vs_initial") is not None]
    if points:
        x, y = zip(*points)
        axis.plot(x, y, marker="o")
        for xi, yi in points:
            axis.annotate(f"{yi:.3f}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center")
    axis.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axis.set(xlabel="iteration", ylabel="win rate vs initial policy", ylim=(0, 1.12), yticks=[0, 0.25, 0.5, 0.75, 1],
             title="Win rate against the initial policy" + ("" if points else " (no eval_prompts)"))
    axis.set_xticks([r["iteration"] for r in rows])
    return _save(plt, figure, path)


def plot_p_win(p_wins: dict[int, tuple[list[float], list[float]]], path: Path) -> Path:
    """Violins of chosen and rejected P(win), keyed by iteration number (from 1, as the summary)."""
    plt, figure, axis = _figure()
    iterations = sorted(p_wins)
    positions, data, colors = [], [], []
    for k, t in enumerate(iterations):
        chosen, rejected = p_wins[t]
        positions += [3 * k + 1, 3 * k + 2]
        data += [chosen or [float("nan")], rejected or [float("nan")]]
        colors += ["tab:green", "tab:red"]
    if data:
        parts = axis.violinplot(data, positions=positions, showmedians=True)
        for body, color in zip(parts["bodies"], colors):
            body.set_facecolor(color)
    axis.set_xticks([3 * k + 1.5 for k in range(len(iterations))], [str(t) for t in iterations])
    axis.set(xlabel="iteration (green: chosen, red: rejected)", ylabel="estimated P(win)", ylim=(0, 1),
             title="Win probabilities of the training pairs")
    return _save(plt, figure, path)


def plot_losses(losses: dict[int, tuple[int, float]], path: Path, gaps: Optional[dict[int, float]] = None) -> Path:
    """The loss per step, iterations marked; with SPPO's ``gaps``, the mean distance of the
    log-ratios to their targets in nats beside it (each iteration brings new targets, so both
    jump at its start)."""
    plt, figure, axis = _figure()
    steps = sorted(losses)
    if steps:
        axis.plot(steps, [losses[s][1] for s in steps], linewidth=1, color="tab:blue")
        for before, step in zip(steps, steps[1:]):
            if losses[step][0] != losses[before][0]:
                axis.axvline(step - 0.5, color="grey", linestyle=":", linewidth=1)
    axis.set(xlabel="optimizer step", ylabel="training loss")
    if gaps:
        right = axis.twinx()
        right.plot(sorted(gaps), [gaps[s] for s in sorted(gaps)], linewidth=1, color="tab:orange")
        right.set_ylabel("mean |log-ratio − target| (nats)", color="tab:orange")
        axis.set_title("SPPO loss (blue) and gap to targets (orange)\ndotted: a new iteration, new targets",
                       fontsize=10)
    else:
        axis.set_title("Training loss per step (dotted: a new iteration)", fontsize=10)
    return _save(plt, figure, path)


FOLLOWING = ("prompt_loose", "prompt_strict", "instruction_loose", "instruction_strict")


def plot_following(rows: list[dict[str, Any]], initial: Optional[dict[str, Any]], path: Path) -> Path:
    """IFEval's four numbers per iteration, the initial policy at iteration 0."""
    plt, figure, axis = _figure()
    points = ([(0, initial)] if initial else []) + [(r["iteration"], r) for r in rows
                                                   if r.get("if_prompt_loose") is not None]
    for key in FOLLOWING:
        axis.plot([x for x, _ in points], [r[f"if_{key}"] for _, r in points], marker="o", label=key.replace("_", " "))
    axis.set(xlabel="iteration (0: initial policy)", ylabel="accuracy", title="Instruction following (held out)")
    axis.set_xticks([x for x, _ in points])
    axis.legend(fontsize=8)
    return _save(plt, figure, path)


def describe(fingerprint: dict[str, Any]) -> str:
    """A plugin's fingerprint in one line: ``HFGenerator (temperature 0.7, top_p 0.9, ...)``."""
    settings = [f"{k} {v if len(str(v)) <= 48 else str(v)[:47] + '…'}" for k, v in fingerprint.items()
                if k != "class" and not isinstance(v, (dict, list))]
    return f"{fingerprint.get('class', '?')} ({', '.join(settings)})" if settings else str(fingerprint.get("class", "?"))


def markdown(rows: list[dict[str, Any]], where: dict[str, str], initial: Optional[dict[str, Any]] = None,
             setup: Optional[dict[str, Any]] = None) -> str:
    """The report: what made the run (``setup``: ``contracts.plugins_of``), one row per iteration,
    then where things are."""
    lines = ["# Self-play run report", ""]
    if setup:
        lines += [f"- method: {setup.get('method', '?')}"]
        lines += [f"- {name}: {describe(setup[name])}" for name in ("ranker", "generator")
                  if isinstance(setup.get(name), dict)]
        lines += [""]
    lines += [
             "| iteration | win rate vs initial | pairs | ties dropped | prompts truncated | chosen / rejected P(win) "
             "| final loss | generate | rank | reference | train | evaluate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = r.get("seconds", {})
        win = r.get("win_rate_vs_initial")
        loss = r.get("final_loss")
        p_win = f"{r['chosen_p_win']:.3f} / {r['rejected_p_win']:.3f}" if "chosen_p_win" in r else "-"
        cells = [str(r["iteration"]), "-" if win is None else f"{win:.3f}", str(r.get("pairs", "-")),
                 str(r.get("ties_dropped", 0)), str(r.get("prompts_truncated", 0)), p_win,
                 "-" if loss is None else f"{loss:.4g}"]
        cells += [f"{seconds[k]:.1f}s" if k in seconds else "-" for k in ("generate", "rank", "reference", "train", "evaluate")]
        lines.append("| " + " | ".join(cells) + " |")
    judged = [r for r in rows if "judge" in r]
    if judged:  # an LLM judge: what it was asked, what the cache answered, how its margins were read
        lines += ["", "| iteration | judge questions asked | answered from the cache | margins from log-probs "
                      "| from parsed verdicts |", "|---|---|---|---|---|"]
        for r in judged:
            j = r["judge"]
            lines.append(f"| {r['iteration']} | {j.get('judge_calls', 0)} | {j.get('cache_hits', 0)} | "
                         f"{j.get('judged_by_logprobs', '-')} | {j.get('judged_by_verdict', '-')} |")
    followed = [r for r in rows if r.get("if_prompt_loose") is not None]
    plots = PLOTS + (("instruction_following.png",) if followed else ())
    if followed:  # IFEval's four numbers on the held-out prompts, the initial policy first
        lines += ["", "Instruction following on the held-out prompts (IFEval's checkers; greedy answers):", "",
                  "| iteration | prompt loose | prompt strict | instruction loose | instruction strict | mean words |",
                  "|---|---|---|---|---|---|"]
        for label, r in ([("0 (initial)", initial)] if initial else []) + [(str(r["iteration"]), r) for r in followed]:
            lines.append(f"| {label} | " + " | ".join(f"{r[f'if_{k}']:.3f}" for k in FOLLOWING) +
                         f" | {r['if_words']:.0f} |")
    lines += ["", "Plots: " + ", ".join(f"[{name}]({name})" for name in plots), ""]
    lines += [f"- {what}: `{place}`" for what, place in where.items()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, rows: list[dict[str, Any]], where: dict[str, str],
                 initial: Optional[dict[str, Any]] = None, setup: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """Write the plots and ``report.md`` into ``run_dir``; returns their paths by name. ``initial``:
    what was measured of the initial policy (instruction following), drawn as iteration 0."""
    run_dir = Path(run_dir)
    p_wins = {}
    for row in rows:
        found = read_p_wins(run_dir, row["iteration"])
        if found is not None:
            p_wins[row["iteration"]] = found
    paths = {
        "win_rate": plot_win_rate(rows, run_dir / "win_rate.png"),
        "p_win": plot_p_win(p_wins, run_dir / "p_win.png"),
        "loss": plot_losses(read_losses(run_dir / "losses.jsonl"), run_dir / "loss.png",
                            read_gaps(run_dir / "losses.jsonl")),
    }
    if any(r.get("if_prompt_loose") is not None for r in rows):
        paths["instruction_following"] = plot_following(rows, initial, run_dir / "instruction_following.png")
    report = run_dir / "report.md"
    atomic_write_bytes(report, markdown(rows, where, initial, setup).encode())
    paths["report"] = report
    return paths


def log_images(loggers: list, paths: dict[str, Path], step: int) -> None:
    """Send the plots to loggers that take images (W&B and others with ``log_image``, TensorBoard)."""
    for logger in loggers:
        for name in ("win_rate", "p_win", "loss", "instruction_following"):
            if name not in paths:
                continue
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"self_play/{name}", images=[str(paths[name])], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                import matplotlib.image

                image = matplotlib.image.imread(str(paths[name]))
                logger.experiment.add_image(f"self_play/{name}", image, step, dataformats="HWC")


def format_row(row: dict[str, Any]) -> str:
    """One console line of a summary row (any method's: the keys it has)."""
    parts = [f"iteration {row['iteration']}"]
    if row.get("win_rate_vs_initial") is not None:
        parts.append(f"win rate vs initial {row['win_rate_vs_initial']:.3f}")
    if row.get("if_prompt_loose") is not None:
        parts.append(format_following(row))
    if "chosen_p_win" in row:
        parts.append(f"p_win chosen {row['chosen_p_win']:.3f} / rejected {row['rejected_p_win']:.3f}")
    if "pairs" in row:
        truncated = f", prompts truncated {row['prompts_truncated']}" if row.get("prompts_truncated") else ""
        parts.append(f"pairs {row['pairs']} (ties dropped {row.get('ties_dropped', 0)}{truncated})")
    if row.get("reward") is not None:
        parts.append(f"reward {row['reward']:.4g}")
    if "ties" in row:
        parts.append(f"ties {row['ties']} (broken by coin {row.get('ties_broken', 0)})")
    if row.get("kl_to_initial") is not None:
        parts.append(f"KL to initial {row['kl_to_initial']:.4g}")
    if row.get("final_loss") is not None:
        parts.append(f"final loss {row['final_loss']:.4g}")
    seconds = row.get("seconds", {})
    parts.append("time " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return " | ".join(parts)


def format_following(row: dict[str, Any]) -> str:
    """The instruction-following numbers of a summary row, on one line."""
    return (f"IF prompt loose {row['if_prompt_loose']:.3f} / strict {row['if_prompt_strict']:.3f}, instruction "
            f"loose {row['if_instruction_loose']:.3f} / strict {row['if_instruction_strict']:.3f}, "
            f"{row['if_words']:.0f} words")
