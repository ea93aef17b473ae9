"""``SelfPlayDataModule``: prompts in, each iteration's generated and ranked pairs out.

The data module holds a self-play method (``sppo_lightning.methods``: ``SPPO``, ``JBOND``,
``OnlinePairs``, ...). The boundary callback (``callbacks/self_play.py``) connects it to the
training module's policies and the processes (``connect``) when fit sets up; at each iteration's
first epoch ``train_dataloader`` has ``begin`` build iteration t's rows through the method and
serves them. ``begin`` returns an :class:`Iteration` (pairs, statistics, samples, its epochs, whether
the optimizer restarts), which the callback reads as ``current``. Control runs one way: callback →
data module → method → stages → artifacts; nothing calls back up.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from sppo_lightning.contracts import PromptScreen, SelfPlayMethod
from sppo_lightning.data.prompts import Prompt, load_prompts
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.datamodules.shuffle import epoch_sampler
from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError, SettingsMismatch
from sppo_lightning.iteration import iteration_number
from sppo_lightning.models import load_tokenizer
from sppo_lightning.policies import Policies


@dataclasses.dataclass(frozen=True)
class Iteration:
    """One self-play iteration as ``SelfPlayDataModule.begin`` built it.

    ``index``: 0-based (``number`` is the 1-based one users read); it trains epochs
    ``first_epoch`` .. ``last_epoch``. ``pairs``: the training rows; ``stats``: the method's
    statistics (the same as in the iteration's manifest, which is for resume only); ``samples``: the
    first pairs as a table for loggers; ``restarts_optimizer``: a fresh optimizer and LR schedule
    at its first batch (SPPO's official pipeline).
    """

    index: int
    first_epoch: int
    epochs: int
    pairs: Any
    stats: dict[str, Any]
    samples: tuple[list[str], list[list[Any]]]
    restarts_optimizer: bool

    @property
    def number(self) -> int:
        return iteration_number(self.index)

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1


@runtime_checkable
class SelfPlayModule(Protocol):
    """What self-play asks of a training module (``PreferenceModule``, ``BondModule``): the policies
    a method samples and scores, and a fresh optimizer where an iteration restarts it."""

    def policies(self) -> Policies: ...

    def restart_optimizer(self, steps: int, epochs: int) -> None: ...


class SelfPlayDataModule(L.LightningDataModule):
    """Serves the rows of the current self-play iteration; one iteration = ``epochs_per_iteration`` epochs.

    The rows do not exist before the iteration starts: ``train_dataloader()`` has the method build
    them (for SPPO: generate with the current policy, rank, estimate win rates, cache reference
    log-probs), so each iteration samples from the policy as it is at that moment. Lightning
    requests the loader at every epoch start (``trainer.reload_dataloaders_every_n_epochs: 1``,
    the CLI's default; checked at setup).

    Args:
        method: the self-play method (``sppo_lightning.methods.SPPO``, ``JBOND``, ``OnlinePairs``),
            with its generator, ranker and settings.
        prompts: prompt file (json/jsonl/parquet), saved dataset folder or hub name.
        eval_prompts: held-out prompts for the win rate against the initial policy.
        tokenizer: linked to ``model.model_name_or_path`` by the CLI.
        prompt_column: the column holding a prompt string or a list of messages.
        split / eval_split: splits for saved dataset folders and hub datasets.
        prompts_per_iteration: use a fresh slice of this many prompts each iteration (the paper's
            disjoint splits); None uses every prompt every iteration.
        epochs_per_iteration: training epochs on each iteration's data (official runs: 1).
        max_prompt_length: prompt tokens kept (from the end, BOS kept); a count is logged.
        batch_size: pairs per training batch.
        skip_bad_rows: skip bad prompts with a counted warning instead of stopping.
        shuffle_seed: each epoch's batch order comes from (shuffle_seed, epoch) alone, so a run
            resumed at an epoch boundary sees the same order as an uninterrupted one.
        drop_duplicate_prompts: keep the first of prompts that repeat an earlier one (same
            conversation); off, repeats are kept and counted in a warning.
        group_by_length: batches of pairs of similar length (``LengthGroupedShuffle``, seeded:
            resume stays exact): less padding, and packed rows of similar pairs. It changes which
            pairs share a step, so it is off by default.
        run_dir: where the iterations' data, the summary and the report go; default
            ``<trainer.default_root_dir>/<the method's run_folder>`` (``self_play``, ``bond``,
            ``online``). Keep it to resume a run.
    """

    def __init__(
        self,
        method: SelfPlayMethod,
        prompts: str,
        eval_prompts: Optional[str] = None,
        tokenizer: Optional[str] = None,
        prompt_column: str = "prompt",
        split: str = "train",
        eval_split: str = "test",
        prompts_per_iteration: Optional[int] = None,
        epochs_per_iteration: int = 1,
        max_prompt_length: int = 512,
        batch_size: int = 8,
        skip_bad_rows: bool = False,
        num_workers: int = 0,
        trust_remote_code: bool = False,
        shuffle_seed: int = 0,
        drop_duplicate_prompts: bool = False,
        run_dir: Optional[str] = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["method"])
        self.method = method
        self.run_dir_setting = run_dir
        self.run_dir = Path(run_dir or Path("runs") / method.run_folder)
        self.prompts_source, self.eval_source = prompts, eval_prompts
        self.tokenizer_name = tokenizer
        self.prompt_column, self.split, self.eval_split = prompt_column, split, eval_split
        self.prompts_per_iteration = prompts_per_iteration
        self.epochs_per_iteration = epochs_per_iteration
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.skip_bad_rows, self.num_workers = skip_bad_rows, num_workers
        self.trust_remote_code = trust_remote_code
        self.shuffle_seed = shuffle_seed
        self.drop_duplicate_prompts = drop_duplicate_prompts
        self.group_by_length = group_by_length
        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.prompts: list[Prompt] = []
        self.eval_prompts: list[Prompt] = []
        self.current: Optional[Iteration] = None  # the iteration being trained (``begin``'s result)
        self.iteration_size = prompts_per_iteration  # what an iteration draws; setup asks the method
        self._source: Optional[SelfPlayModule] = None  # connect()
        self._ctx: Optional[DistContext] = None
        # iteration -> the fingerprint of π_t, kept in checkpoints: a run resumed in the middle of an
        # iteration holds later weights, and the samples on disk are checked against π_t's.
        self.identities: dict[int, str] = {}

    def setup(self, stage: str) -> None:
        for key, value in (("epochs_per_iteration", self.epochs_per_iteration), ("batch_size", self.batch_size),
                           ("max_prompt_length", self.max_prompt_length)):
            if value < 1:
                raise ConfigError(f"data.{key} must be at least 1, got {value}")
        if self.prompts_per_iteration is not None and self.prompts_per_iteration < 1:
            raise ConfigError(f"data.prompts_per_iteration must be at least 1, got {self.prompts_per_iteration}")
        trainer = self.trainer
        if trainer is not None:
            if trainer.reload_dataloaders_every_n_epochs != 1:  # type: ignore[attr-defined]  # a Trainer property
                raise ConfigError("SelfPlayDataModule makes new rows every iteration: set "
                                  "trainer.reload_dataloaders_every_n_epochs to 1 (the CLI's default)")
            self.run_dir = Path(self.run_dir_setting or Path(trainer.default_root_dir) / self.method.run_folder)
        if self.tokenizer is None:
            if self.tokenizer_name is None:
                raise ConfigError("data.tokenizer is not set (the CLI links it to model.model_name_or_path)")
            self.tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        if not self.prompts:
            self.prompts = self._screened(self._load(self.prompts_source, self.split), self.prompts_source)
        if self.eval_source is not None and not self.eval_prompts:
            self.eval_prompts = self._screened(self._load(self.eval_source, self.eval_split), self.eval_source)
        if trainer is not None:  # per-step methods draw one optimizer step's prompts per iteration
            per_step = self.batch_size * trainer.accumulate_grad_batches * trainer.world_size
            self.iteration_size = self.method.prompts_per_iteration(per_step, self.prompts_per_iteration,
                                                                    self.epochs_per_iteration, len(self.prompts))

    def _load(self, source: str, split: str) -> list[Prompt]:
        prompts, truncated, skipped = load_prompts(
            source, self.tokenizer, self.max_prompt_length, self.prompt_column, split, self.skip_bad_rows
        )
        if skipped:
            rank_zero_warn(f"{source}: skipped {len(skipped)} bad prompt(s); first: {skipped[0]}")
        if truncated:
            rank_zero_info(f"{source}: {truncated} prompt(s) longer than {self.max_prompt_length} tokens kept their end")
        first: dict[str, int] = {}
        repeats = []
        for prompt in prompts:
            key = json.dumps(prompt.messages, sort_keys=True)
            if key in first:
                repeats.append((prompt.index, first[key]))
            else:
                first[key] = prompt.index
        if repeats:
            row, original = repeats[0]
            if self.drop_duplicate_prompts:
                dropped = {r for r, _ in repeats}
                prompts = [p for p in prompts if p.index not in dropped]
                rank_zero_warn(f"{source}: dropped {len(repeats)} duplicate prompt(s) (first: row {row + 1} repeats "
                               f"row {original + 1})")
            else:
                rank_zero_warn(f"{source}: {len(repeats)} prompt(s) repeat an earlier one (first: row {row + 1} "
                               f"repeats row {original + 1}); set data.drop_duplicate_prompts: true to drop them")
        return prompts

    def _screened(self, prompts: list[Prompt], source: str) -> list[Prompt]:
        """``prompts`` less those the method's ranker says at start-up it cannot score (a ``PromptScreen``:
        instructions whose checker cannot run here), each reason in one line naming ``source``."""
        ranker = self.method.ranker
        if not isinstance(ranker, PromptScreen):
            return prompts
        keep, lines = ranker.screen_prompts([(p.text, p.meta) for p in prompts])
        for line in lines:
            rank_zero_warn(f"{source}: {line}")
        if not keep:
            raise ConfigError(f"{source}: no prompt is left that {type(ranker).__name__} can score here")
        return [prompts[i] for i in keep]

    @property
    def max_length(self) -> int:
        """The longest training row: prompt plus response, for the memory estimate."""
        return self.max_prompt_length + self.method.generator.max_new_tokens

    def connect(self, source: SelfPlayModule, ctx: DistContext) -> None:
        """What ``train_dataloader`` builds iterations from: the training module's policies (asked
        for at each iteration's start) and the processes. The boundary callback calls it at setup."""
        self._source, self._ctx = source, ctx

    def begin(self, index: int, policies: Policies, ctx: DistContext) -> Iteration:
        """Iteration ``index`` (0-based): its rows, made by the method from ``policies`` (π_t: the
        weights as they are now, recorded as the iteration's identity the first time), or reloaded
        from the run folder."""
        if index not in self.identities:  # the iteration begins now: these weights are π_t
            self.identities[index] = ctx.broadcast(policies.fingerprint())
        policies = dataclasses.replace(policies, identity=self.identities[index])
        try:
            data = self.method.build(index, self.iteration_prompts(index), policies, self.tokenizer, ctx, self.run_dir)
        except SettingsMismatch as err:
            raise ConfigError(f"{err}; to start a fresh run instead, add {self.fresh_run_flag()}") from None
        return Iteration(index, index * self.epochs_per_iteration, self.epochs_per_iteration, data.pairs, data.stats,
                         data.samples, self.method.restarts_optimizer)

    def iteration_prompts(self, iteration: int) -> list[Prompt]:
        """The prompts of iteration t: all of them, or the t-th slice of ``prompts_per_iteration``
        (wrapping around when the file runs out)."""
        n = self.iteration_size
        if n is None or n >= len(self.prompts):
            return list(self.prompts)
        start = (iteration * n) % len(self.prompts)
        picked = self.prompts[start : start + n]
        return picked + self.prompts[: n - len(picked)]

    def fresh_run_flag(self) -> str:
        """The one flag that gives this run folders of its own: a new root (every output follows it),
        or, where ``run_dir`` is set, a new run dir; the first free ``<name>-2``, ``<name>-3``, ..."""
        key, current = ("--data.run_dir", self.run_dir) if self.run_dir_setting else \
            ("--trainer.default_root_dir", Path(self.trainer.default_root_dir) if self.trainer else self.run_dir.parent)
        n = 2
        while Path(f"{current}-{n}").exists():
            n += 1
        return f"{key} {current}-{n}"

    def state_dict(self) -> dict[str, Any]:
        return {"policy_identities": {str(k): v for k, v in self.identities.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.identities = {int(k): v for k, v in state.get("policy_identities", {}).items()}

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer else 0
        index = epoch // self.epochs_per_iteration
        if self.current is None or self.current.index != index:
            if self._source is None or self._ctx is None:
                raise ConfigError("SelfPlayDataModule needs the SelfPlay callback (sppo_lightning.callbacks.self_play."
                                  "SelfPlay; the CLI adds it): it starts each iteration and records its results")
            self.current = self.begin(index, self._source.policies(), self._ctx)
        pairs = self.current.pairs
        return DataLoader(
            pairs,
            batch_size=self.batch_size,
            sampler=epoch_sampler(pairs, self.batch_size, self.shuffle_seed, lambda: epoch, self.group_by_length),
            collate_fn=partial(collate_pairs, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )
