"""Win rate of the current policy against the initial one, on held-out prompts, by the run's ranker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import lightning as L

from sppo_lightning.contracts import EngineGenerator, Generator
from sppo_lightning.data.prompts import Prompt
from sppo_lightning.files import atomic_write_json
from sppo_lightning.pipeline.generators import HFGenerator
from sppo_lightning.pipeline.stages import prompt_fields, ranker_prompts
from sppo_lightning.ranking import Ranker

# (prompts, samples per prompt, seed) -> [N][samples] response ids, on all ranks
Sampler = Callable[[list[Prompt], int, int], list[list[list[int]]]]


def policy_sampler(generator, trainer: L.Trainer, tokenizer) -> Sampler:
    """A ``Sampler`` of the module's current policy with ``generator`` (its progress bar says evaluating)."""
    from sppo_lightning.distributed import DistContext

    def sample(prompts: list[Prompt], num_samples: int, seed: int) -> list[list[list[int]]]:
        return generator.sample(trainer.lightning_module.policy, tokenizer, prompts, num_samples, seed,
                                DistContext.from_trainer(trainer), desc="evaluating (win rate vs initial)")
    return sample


class InitialPolicyWinRate:
    """P(current policy's response beats the initial policy's), ties counting one half.

    The initial policy's answers are sampled once, before any training, and kept in
    ``<run_dir>/initial_eval.json`` (a resumed run reuses them). Every measurement samples with the
    same seed as the initial answers, so the comparison is paired and its noise small.
    """

    def __init__(self, run_dir: Path, ranker: Ranker, sample: Sampler, samples_per_prompt: int, seed: int) -> None:
        self.path = Path(run_dir) / "initial_eval.json"
        self.ranker, self.sample = ranker, sample
        self.samples_per_prompt, self.seed = samples_per_prompt, seed

    def initial(self, trainer: L.Trainer, prompts: list[Prompt]) -> list[list[list[int]]]:
        if trainer.strategy.broadcast(self.path.exists()):  # rank 0 decides (see stage_runner.run_stage)
            return json.loads(self.path.read_text())
        responses = self.sample(prompts, self.samples_per_prompt, self.seed)
        if trainer.is_global_zero:
            atomic_write_json(self.path, responses)
        trainer.strategy.barrier("initial_eval")
        return responses

    def measure(self, trainer: L.Trainer, prompts: list[Prompt], tokenizer) -> float:
        initial = self.initial(trainer, prompts)
        current = self.sample(prompts, self.samples_per_prompt, self.seed)
        texts, candidates = [], []
        for shown, new, old in zip(shown_prompts(self.ranker, tokenizer, prompts), current, initial):
            for a, b in zip(tokenizer.batch_decode(new, skip_special_tokens=True),
                            tokenizer.batch_decode(old, skip_special_tokens=True)):
                texts.append(shown)
                candidates.append([a, b])
        return paired_win_rate(self.ranker, texts, candidates)


def shown_prompts(ranker: Ranker, tokenizer, prompts: list[Prompt]) -> list[str]:
    """What ``ranker`` reads of each prompt: the rank stage's own view of the generations row the
    prompt would make (``stages.prompt_fields``, ``stages.ranker_prompts``)."""
    return ranker_prompts(ranker, tokenizer, [prompt_fields(p) for p in prompts])


def paired_win_rate(ranker: Ranker, shown: list[str], candidates: list[list[str]]) -> float:
    """P(the first candidate beats the second) by ``ranker``, ties counting one half."""
    m = ranker.pairwise_logits(shown, candidates)
    margin = (m[:, 0, 1] - m[:, 1, 0]).double()
    return float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


def evaluation_generator(generator: Generator) -> Generator:
    """The generator the win rate samples the policy in memory with: the run's own (a live vLLM
    engine included), or, for an engine on per-iteration exports (``live: false``), Hugging Face
    ``generate`` with the engine's sampling settings."""
    if not isinstance(generator, EngineGenerator) or generator.live:
        return generator
    return HFGenerator(generator.temperature, generator.top_p, generator.max_new_tokens, generator.batch_size)
