"""The contracts between the parts, declared in one place: what a self-play method, a generator, an
engine generator, a ranker and a judge that asks questions must have.

Code that holds one of these checks it with ``isinstance`` (all are ``runtime_checkable``) and uses
its members directly: nothing probes a plug-in with ``getattr``. Settings are read-only properties
here, so a plain attribute of a narrower type (a ``Literal``) meets them; mypy checks conformance
(``.ci/run``). A plug-in of yours is a class with
these members (no base class to inherit), named by ``class_path`` in a config. This module imports
nothing of ours at run time (the annotations' types are the lowest layers), so every layer can use it.

* :class:`Generator`: how π samples K responses per prompt (``HFGenerator``,
  ``LinearAlignmentGenerator``, ``VLLMGenerator``).
* :class:`EngineGenerator`: a generator that samples in an engine of its own (``VLLMGenerator``):
  π reaches it in memory or through a per-iteration export, and the engine is released and closed.
* :class:`Ranker`: the preference oracle (``PairRMRanker``, ``RewardModelRanker``, ``LLMJudge``,
  ``OpenAIJudge``, ``FunctionJudge``, ``VerifiableInstructionRanker``).
* :class:`QuestionJudge`: a ranker that asks a judge questions (``LLMJudge``, ``OpenAIJudge``): its
  answers are kept in the run's cache and counted.
* :class:`SelfPlayMethod`: what ``SelfPlayDataModule`` and the boundary callback ask of SPPO,
  J-BOND and the online method; :class:`IterationData` is what its ``build`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from sppo_lightning.data.prompts import Prompt
    from sppo_lightning.distributed import DistContext
    from sppo_lightning.policies import Policies

# What a ranker is shown of the prompt: the raw text of the user's prompt (the default), the
# policy's chat-templated prompt string, as the official SPPO ``rank.py`` passes it to PairRM, or
# the prompt row as a JSON object (its text under "prompt", and an IFEval-format file's
# instructions: ``instruction_id_list``, ``kwargs``, ``key``) for rankers that check instructions.
PromptView = Literal["raw", "chat", "record"]
PROMPT_VIEWS = ("raw", "chat", "record")


@runtime_checkable
class Generator(Protocol):
    """How π samples. ``batch_size``: prompts per batch (seeds are per batch, and shards are cut at
    batch boundaries); ``temperature``, ``top_p``, ``max_new_tokens``: its sampling settings (the
    evaluation of an export-only engine samples in memory with them; ``max_new_tokens`` bounds the
    training rows' length)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def temperature(self) -> float: ...

    @property
    def top_p(self) -> float: ...

    @property
    def max_new_tokens(self) -> int: ...

    def sample(self, model: Any, tokenizer: Any, prompts: Sequence[Prompt], num_samples: int, seed: int,
               ctx: DistContext, batch_offset: int = 0, desc: str = "sampling") -> list[list[list[int]]]:
        """``[N][num_samples]`` response token ids (EOS kept where the model stopped), the same on
        every rank. ``model``: the policy module, or for an :class:`EngineGenerator` whose
        ``exports_policy(policy)`` is true, the ``PolicyExport`` of π_t the pipeline wrote this
        iteration. ``seed`` with the global batch index ``batch_offset + b`` fixes batch b's
        samples, so a prompt's samples do not depend on the shard or rank that draws it. ``desc``
        labels the progress bar."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description of everything that changes the samples: a run folder made with
        another generator is refused on resume rather than mixed."""
        ...


@runtime_checkable
class EngineGenerator(Generator, Protocol):
    """A generator with an engine of its own (vLLM).

    ``live``: the engine follows π's weights in memory (false: it starts on a per-iteration export
    of π_t). ``lora``: how a LoRA policy is exported (``auto``, ``merged``, ``adapter``).
    ``keep_policy_exports``: how many per-iteration exports of π_t to keep (-1: all, 0: none).
    ``offload_policy``: move the training policy to the CPU while the engine samples."""

    @property
    def live(self) -> bool: ...

    @property
    def lora(self) -> str: ...

    @property
    def keep_policy_exports(self) -> int: ...

    @property
    def offload_policy(self) -> bool: ...

    def exports_policy(self, policy: Any) -> bool:
        """Whether ``policy`` reaches the engine through a per-iteration export (``live: false``,
        or a policy the live engine cannot take in memory) rather than in memory."""
        ...

    def release(self) -> None:
        """An iteration's generations are written: an export engine stops, a live one stays."""
        ...

    def close(self) -> None:
        """Stop the engine, live or not (the run is over)."""
        ...


@runtime_checkable
class LogprobSampler(Generator, Protocol):
    """A generator that samples π itself and returns, with each response, the sum of its tokens'
    log-probs under π's raw logits (temperature 1, before any sampling processing): π_t's reference
    log-probs without a forward of their own (``reference_logps: sampler``)."""

    def sample_with_logprobs(self, model: Any, tokenizer: Any, prompts: Sequence[Prompt], num_samples: int,
                             seed: int, ctx: DistContext, batch_offset: int = 0,
                             desc: str = "sampling") -> tuple[list[list[list[int]]], list[list[float]]]:
        """``sample``'s ids, and ``[N][num_samples]`` summed log-probs, on every rank."""
        ...


@runtime_checkable
class Ranker(Protocol):
    """The preference oracle. ``prompt_view``: what it is shown of each prompt (:data:`PromptView`)."""

    @property
    def prompt_view(self) -> str: ...

    def pairwise_logits(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        """``[N, K, K]`` float tensor; ``M[n, i, j] > 0`` means candidate i beats j for prompt n."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description of everything that changes the scores (class, weights, settings):
        a resumed run whose ranker fingerprints differently redoes the rankings."""
        ...


@runtime_checkable
class QuestionJudge(Ranker, Protocol):
    """A ranker that asks a judge a question per pair: ``use_cache`` gives it the run's cache of
    answers (``ranking.cache.JudgmentCache``; ``cache`` is it, or None), and ``counts()`` says how
    many questions it has asked so far: ``calls`` (asked of the model), and where the judge says,
    ``by_logprobs`` / ``by_verdict`` (how each answer was read)."""

    @property
    def cache(self) -> Any: ...

    def use_cache(self, cache: Any) -> None: ...

    def counts(self) -> dict[str, int]: ...


@runtime_checkable
class PromptScreen(Ranker, Protocol):
    """A ranker that can tell at start-up which prompts it cannot score in full (the verifiable-
    instruction ranker: instructions whose checker cannot run here). The data module drops those
    prompts when it loads them, with the ranker's lines, so nothing fails mid-iteration."""

    def screen_prompts(self, prompts: Sequence[tuple[str, Optional[dict[str, Any]]]]) -> tuple[list[int], list[str]]:
        """``prompts``: (text, IFEval metadata or None) per prompt. Returns the indices kept and one
        line per reason to drop, naming it and how many prompts it drops."""
        ...


@dataclass
class IterationData:
    """What a method's ``build`` returns: the training rows (anything with ``len`` and integer
    indexing; a memory-mapped ``datasets.Dataset``), the iteration's statistics (also in its
    manifest), and the first pairs as a table for loggers."""

    pairs: Any
    stats: dict[str, Any]
    samples: tuple[list[str], list[list[Any]]] = field(default_factory=lambda: ([], []))


@runtime_checkable
class SelfPlayMethod(Protocol):
    """What the data module and the boundary callback need of a method.

    Attributes:
        generator: how π samples (a :class:`Generator`); the win rate against the initial policy
            samples with it too.
        ranker: the preference oracle (a :class:`Ranker`); the win rate is judged by it.
        seed: the method's sampling seed (the evaluation draws its own stream from it).
        run_folder: the run folder's default name under ``trainer.default_root_dir``.
        log_prefix: the prefix of the statistics the boundary logs (``self_play/``, ``bond/``).
        restarts_optimizer: a fresh optimizer and LR schedule at every iteration (SPPO's
            official pipeline, a new training job per iteration), or one for the whole run.
        caches_reference: the method stores π_t's log-probs as the reference (a frozen copy of
            the initial policy in the module is then held for nothing: warned).
    """

    @property
    def generator(self) -> Generator: ...

    @property
    def ranker(self) -> Ranker: ...

    @property
    def seed(self) -> int: ...

    @property
    def run_folder(self) -> str: ...

    @property
    def log_prefix(self) -> str: ...

    @property
    def restarts_optimizer(self) -> bool: ...

    @property
    def caches_reference(self) -> bool: ...

    def prompts_per_iteration(self, per_step: int, configured: Optional[int], epochs_per_iteration: int,
                              total: int) -> Optional[int]:
        """How many prompts an iteration draws, given one optimizer step's prompts (``per_step``),
        the data module's ``prompts_per_iteration`` (``configured``; None: all ``total`` prompts):
        on-policy methods draw one step's worth; others return ``configured``."""
        ...

    def build(self, iteration: int, prompts: Sequence[Prompt], policies: Policies, tokenizer: Any,
              ctx: DistContext, run_dir: Path) -> IterationData:
        """Iteration ``iteration`` (0-based)'s training rows on ``prompts``, made (or reloaded from
        ``run_dir``) with ``policies``."""
        ...

    def summary(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The statistics of an iteration to put in its summary row (``summary.json``)."""
        ...


def lacking(plugin: Any, contract: type) -> list[str]:
    """The members of ``contract`` (a Protocol above) that ``plugin`` does not have, for a one-line
    error naming them (``isinstance`` alone says only no)."""
    names: set[str] = set()
    for cls in contract.__mro__:
        if cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        names.update(cls.__dict__.get("__annotations__", {}))
        names.update(k for k, v in cls.__dict__.items()
                     if (callable(v) or isinstance(v, property)) and not k.startswith("_"))
    return sorted(name for name in names if not hasattr(plugin, name))


def plugins_of(method: SelfPlayMethod) -> dict[str, Any]:
    """The method's class and its ranker's and generator's fingerprints (class and key settings),
    as JSON gives them back: what a run records of itself (manifest, summary, report)."""
    import json

    named = {"method": type(method).__name__, "ranker": method.ranker.fingerprint(),
             "generator": method.generator.fingerprint()}
    return json.loads(json.dumps(named, default=str))  # in the order each fingerprint gives
