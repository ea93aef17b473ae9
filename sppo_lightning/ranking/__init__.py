"""Rankers (PairRM, reward models, Python judges, LLM judges) and SPPO's win-probability estimate.

Every ranker answers one question: for prompt n and candidates i, j, how much better is i than j?
``pairwise_logits(prompts, candidates)`` returns ``M[N, K, K]`` (``protocol.py``); its
``fingerprint()`` says what its scores depend on, so that saved rankings are redone when it
changes. ``estimate.py`` turns M into SPPO's win probabilities and pairs. This file re-exports.
"""

from sppo_lightning.ranking.estimate import (
    PairSelection, pairwise_from_rewards, scores_from_pairwise, select_pairs, win_probabilities,
)
from sppo_lightning.ranking.protocol import PromptView, Ranker, fingerprint_of, prompt_view_of, weights_fingerprint
from sppo_lightning.ranking.function import FunctionJudge
from sppo_lightning.ranking.llm_judge import LLMJudge
from sppo_lightning.ranking.openai_judge import OpenAIJudge
from sppo_lightning.ranking.pairrm import PairRMRanker
from sppo_lightning.ranking.reward_model import RewardModelRanker
from sppo_lightning.ranking.verifiable import VerifiableInstructionRanker

__all__ = [
    "FunctionJudge",
    "LLMJudge",
    "OpenAIJudge",
    "PairRMRanker",
    "PairSelection",
    "PromptView",
    "Ranker",
    "RewardModelRanker",
    "fingerprint_of",
    "pairwise_from_rewards",
    "prompt_view_of",
    "scores_from_pairwise",
    "select_pairs",
    "VerifiableInstructionRanker",
    "weights_fingerprint",
    "win_probabilities",
]
