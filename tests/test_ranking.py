import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.ranking import (
    FunctionJudge, PairRMRanker, Ranker, RewardModelRanker, scores_from_pairwise, select_pairs,
    win_probabilities,
)
from sppo_lightning.ranking.pairrm import import_llm_blender


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- the estimate
def test_scores_from_pairwise_hand_value():
    m = torch.tensor([[[0.0, 2.0, 1.0], [-1.0, 0.0, 0.5], [0.0, 1.5, 0.0]]])
    # s_i = mean_j (M_ij - M_ji): s_0 = (0 + (2+1) + (1-0))/3, s_1 = ((-1-2) + 0 + (0.5-1.5))/3,
    # s_2 = ((0-1) + (1.5-0.5) + 0)/3
    s = scores_from_pairwise(m)
    assert s[0].tolist() == pytest.approx([4 / 3, -4 / 3, 0.0])
    assert s.sum().item() == pytest.approx(0.0, abs=1e-6)  # antisymmetric: scores sum to 0


def test_win_probabilities_hand_values():
    pairwise, win_rate = win_probabilities(torch.tensor([[1.0, 0.0, -1.0]]))
    assert pairwise[0, 0, 1].item() == pytest.approx(sigmoid(1.0))
    assert pairwise[0, 2, 0].item() == pytest.approx(sigmoid(-2.0))
    assert torch.allclose(pairwise[0].diagonal(), torch.full((3,), 0.5, dtype=torch.float64))
    # p_win includes the self term: (0.5 + σ(1) + σ(2)) / 3
    assert win_rate[0, 0].item() == pytest.approx((0.5 + sigmoid(1) + sigmoid(2)) / 3)
    assert win_rate.sum().item() == pytest.approx(3 / 2)  # Σ p_win = K/2


def test_select_pairs_picks_best_and_worst_and_drops_ties():
    scores = torch.tensor([[0.2, 1.5, -0.7, 1.5], [0.3, 0.3, 0.3, 0.3], [-1.0, 2.0, 0.0, 0.5]])
    picked = select_pairs(scores)
    assert picked.chosen.tolist() == [1, 0, 1]  # first index on ties, as numpy.argmax
    assert picked.rejected.tolist() == [2, 0, 0]
    assert picked.keep.tolist() == [True, False, True]
    _, win_rate = win_probabilities(scores)
    assert picked.chosen_probs[0].item() == pytest.approx(sigmoid(1.5 - -0.7))
    assert picked.chosen_probs_win[2].item() == pytest.approx(win_rate[2, 1].item())
    assert picked.chosen_probs_lose[2].item() == pytest.approx(win_rate[2, 0].item())
    assert (picked.chosen_probs_win[picked.keep] >= 0.5).all() and (picked.chosen_probs_lose <= 0.5).all()


def test_non_finite_scores_name_the_prompt_row():
    with pytest.raises(DataError, match="iteration 2: prompt row 2: the ranker returned a non-finite score"):
        select_pairs(torch.tensor([[0.0, 1.0], [math.nan, 1.0]]), where="iteration 2")


# ----------------------------------------------------------------------------- function judge
def test_function_judge_pair_logits_are_reward_differences():
    judge = FunctionJudge("sppo_lightning.ranking.judges:shorter")
    assert isinstance(judge, Ranker)
    m = judge.pairwise_logits(["q"], [["a", "abc", "ab"]])
    assert m[0].tolist() == [[0.0, 2.0, 1.0], [-2.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]
    assert FunctionJudge("sppo_lightning.ranking.judges.shorter").rewards(["q"], [["xy"]]).item() == -2.0


@pytest.mark.parametrize("path, message", [
    ("nojudge", "must look like"),
    ("sppo_lightning.ranking.judges:missing", "cannot import"),
    ("no_such_module_xyz:f", "cannot import"),
])
def test_function_judge_bad_paths_are_config_errors(path, message):
    with pytest.raises(ConfigError, match=message):
        FunctionJudge(path)


def nan_judge(prompt, response):
    return float("nan") if "bad" in response else 1.0


def test_function_judge_non_finite_value_names_row_and_candidate():
    judge = FunctionJudge(f"{__name__}:nan_judge")
    with pytest.raises(DataError, match="prompt row 2, candidate 0: returned nan"):
        judge.rewards(["p", "q"], [["ok", "fine"], ["bad", "ok"]])


# ----------------------------------------------------------------------------- reward model
def test_reward_model_ranker(tmp_path, tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts, cands = ["Name a color.", "What is 2 plus 2?"], [["Blue.", "I do not know at all."], ["4.", "five"]]
    together = RewardModelRanker(str(tmp_path / "rm"), batch_size=4).rewards(prompts, cands)
    one_by_one = RewardModelRanker(str(tmp_path / "rm"), batch_size=1).rewards(prompts, cands)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)  # padding does not matter
    m = RewardModelRanker(str(tmp_path / "rm")).pairwise_logits(prompts, cands)
    torch.testing.assert_close(m, together.unsqueeze(-1) - together.unsqueeze(-2))
    assert together[0, 0] != together[0, 1]


# ----------------------------------------------------------------------------- PairRM
PROMPTS = ["What is 2 plus 2?", "Name a color. " * 30, "Why is the sky blue?"]
CANDIDATES = [
    ["4.", "five", "I think it is 4 because two and two make four", "no"],
    ["Blue.", "red " * 60, "green", "The sky is blue."],
    ["Because of [SEP] light.", "It is not.", "Rayleigh scattering of sunlight.", "blue blue blue"],
]


def blender_for(path):
    llm_blender = import_llm_blender()
    blender = llm_blender.Blender(blender_config=llm_blender.BlenderConfig(device="cpu", use_tqdm=False))
    blender.loadranker(path, device="cpu")
    return blender


def test_llm_blender_imports_on_this_transformers_through_the_shims():
    import transformers
    from transformers import PreTrainedTokenizerBase

    llm_blender = import_llm_blender()
    assert hasattr(llm_blender, "Blender")
    assert hasattr(PreTrainedTokenizerBase, "batch_encode_plus")
    assert hasattr(transformers.utils.hub, "TRANSFORMERS_CACHE")


def test_pairrm_scores_match_llm_blender_rank(tiny_pairrm):
    """The official pipeline's call: Blender.rank(return_scores=True, batch_size=1). Small length
    budgets make the long prompt and candidate exercise truncation (a short prompt leaves its unused
    budget to the candidates), and a literal [SEP] the separator replacement."""
    blender_dir, _ = tiny_pairrm
    expected = torch.tensor(blender_for(blender_dir).rank(
        PROMPTS, CANDIDATES, return_scores=True, batch_size=1, source_max_length=48, candidate_max_length=24))
    ours = PairRMRanker.from_pretrained(blender_dir, batch_size=5, source_max_length=48,
                                        candidate_max_length=24).scores(PROMPTS, CANDIDATES)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert expected.abs().max() > 0.05, "the tiny ranker must give scores that differ"


def test_pairrm_pair_logits_match_llm_blender_compare(tiny_pairrm):
    blender_dir, _ = tiny_pairrm
    blender = blender_for(blender_dir)
    # compare() needs the default budgets; they fit these texts whole.
    m = PairRMRanker.from_pretrained(blender_dir).pairwise_logits(PROMPTS, CANDIDATES)
    assert torch.equal(m.diagonal(dim1=1, dim2=2), torch.zeros(3, 4))
    a = [c[2] for c in CANDIDATES]
    b = [c[0] for c in CANDIDATES]
    first_slot = blender.compare(PROMPTS, a, b, mode="[A,B]", return_logits=True, batch_size=1)
    torch.testing.assert_close(m[:, 2, 0], torch.tensor(first_slot, dtype=torch.float32), atol=1e-4, rtol=0)


def test_pairrm_both_layouts_and_any_batch_size_agree(tiny_pairrm):
    blender_dir, hf_dir = tiny_pairrm
    reference = PairRMRanker.from_pretrained(blender_dir, batch_size=1).pairwise_logits(PROMPTS, CANDIDATES)
    for path, batch_size in ((hf_dir, 7), (blender_dir, 64)):
        m = PairRMRanker.from_pretrained(path, batch_size=batch_size).pairwise_logits(PROMPTS, CANDIDATES)
        torch.testing.assert_close(m, reference, atol=1e-5, rtol=0)


def test_pairrm_missing_checkpoint_is_a_load_error(tmp_path):
    from sppo_lightning.errors import LoadError

    with pytest.raises(LoadError, match="no config.json"):
        PairRMRanker.from_pretrained(str(tmp_path))
