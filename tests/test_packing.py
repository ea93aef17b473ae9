"""Packed pair batches (sppo_lightning.packing): the layout by hand, and the padded path's numbers,
log-probs and gradients, on Llama, Qwen2, Mistral (sliding window) and Gemma-2 (soft-capping,
alternating windows), under sdpa, eager and flex attention, with LoRA, QLoRA and checkpointing."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from sppo_lightning import loss_table
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.errors import ConfigError
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.packing import allowed, attention_masks, lay_out, pack_pairs, packing_unsupported, resolve_packing

VOCAB = 97
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
# Windows of 5 positions, shorter than most sequences below, so that the window is exercised.
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "qwen2": lambda: Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=5),
    "gemma2": lambda: Gemma2Config(**SHAPE, head_dim=8, sliding_window=5),  # soft-caps scores and logits
}
CASES = [(name, impl) for name in CONFIGS for impl in ("sdpa", "eager") if (name, impl) != ("gemma2", "sdpa")]


def example(prompt, chosen, rejected, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return {"prompt_ids": ids(prompt), "chosen_ids": ids(chosen), "rejected_ids": ids(rejected),
            "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3, "chosen_probs": 0.6}


# Chosen and rejected of different lengths; a pair of 1-token responses; a prompt longer than both
# responses; and (with a budget of 16) a pair longer than the budget, which gets a row of its own.
EXAMPLES = [example(7, 3, 9, 0), example(2, 1, 1, 1), example(12, 4, 2, 2), example(3, 15, 6, 3), example(5, 6, 2, 4)]
BUDGET = 16


def model_of(name, impl, seed=1):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=impl).eval()


def test_pairs_are_laid_first_fit_longest_first():
    assert lay_out([5, 9, 3, 4], budget=10) == [[1], [0, 3], [2]]
    assert lay_out([12, 2], budget=10) == [[0], [1]]  # longer than the budget: a row of its own


def test_the_layout_by_hand():
    batch = collate_pairs([example(3, 2, 1, 0), example(2, 1, 2, 1)], pad_token_id=0)
    packed = pack_pairs(batch, budget=100)
    ids = batch["input_ids"]
    assert packed.input_ids.shape == (1, 11)  # 3 + 2 + 1 and 2 + 1 + 2: each prompt once, no padding
    assert packed.input_ids[0].tolist() == ids[0, :5].tolist() + ids[2, 3:4].tolist() + ids[1, :3].tolist() + ids[3, 2:4].tolist()
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3]  # rejected restarts after its prompt
    assert packed.branch[0].tolist() == [0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2]
    assert packed.pair[0].tolist() == [0] * 6 + [1] * 5
    # Targets: chosen 0 at columns 2, 3; rejected 0's one token predicted from the prompt's last (2).
    assert packed.target_seq.tolist() == [0, 0, 2, 1, 3, 3]
    assert packed.target_col.tolist() == [2, 3, 2, 7, 7, 9]
    mask = allowed(packed)[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True] + [False] * 5  # rejected: prompt + itself
    assert not mask[6:, :6].any() and not mask[:6, 6:].any()  # pairs never see each other


def test_the_mask_keeps_the_window_on_restarted_positions():
    packed = pack_pairs(collate_pairs([example(4, 3, 3, 0)], 0), budget=100)
    mask = allowed(packed, window=3)[0, 0]
    # the rejected response's last token (position 6) sees positions 4..6: rejected tokens 7, 8, 9
    assert mask[9].nonzero().flatten().tolist() == [7, 8, 9]
    assert mask[7].nonzero().flatten().tolist() == [2, 3, 7]  # position 4: prompt positions 2, 3 and itself


@pytest.mark.parametrize("name,impl", CASES)
def test_packed_logps_equal_the_padded_ones(name, impl):
    model, batch = model_of(name, impl), collate_pairs(EXAMPLES, 0)
    with torch.no_grad():
        padded = model_logprobs(model, batch)
        packed = model_logprobs(model, batch, packing=BUDGET)
    assert pack_pairs(batch, BUDGET).input_ids.shape[0] < batch["input_ids"].shape[0]
    torch.testing.assert_close(packed.sum, padded.sum, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.mean, padded.mean, rtol=0, atol=1e-5)
    assert torch.equal(packed.n_tokens, padded.n_tokens)


def loss_grads(model, batch, loss, packing):
    model.zero_grad()
    logps = model_logprobs(model, batch, packing=packing)
    reference = logps.sum.detach() - 0.5
    hyper = loss_table.resolve_hyperparameters(loss, {"eta": 10.0} if loss == "sppo" else {}, None)
    per_pair, _ = loss_table.compute_loss(loss, hyper, logps, reference, batch)
    per_pair.mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-5 * a[n].abs().max().item(), msg=n)


@pytest.mark.parametrize("name,impl", CASES)
@pytest.mark.parametrize("loss", ["sppo", "dpo"])
def test_packed_gradients_equal_the_padded_ones(name, impl, loss):
    model, batch = model_of(name, impl).train(), collate_pairs(EXAMPLES, 0)
    assert_same_grads(loss_grads(model, batch, loss, None), loss_grads(model, batch, loss, BUDGET))


def test_flex_attention_block_mask_is_the_dense_rule():
    from torch.nn.attention.flex_attention import create_mask

    from sppo_lightning.packing import block_mask

    packed = pack_pairs(collate_pairs(EXAMPLES, 0), BUDGET)
    rows, length = packed.input_ids.shape
    for window in (None, 5):
        blocks = block_mask(packed, window)
        dense = create_mask(blocks.mask_mod, rows, None, length, length, device="cpu")
        assert torch.equal(dense, allowed(packed, window))


def flex_rows(budget, seed=0):
    """Pairs packed into rows of ``budget`` tokens, with lengths around flex attention's block
    boundaries: prompt and responses such that rows end just before, at and after 128 and 256."""
    examples = [example(p, c, r, seed + i) for i, (p, c, r) in
                enumerate([(60, 40, 27), (2, 1, 1), (90, 30, 8), (100, 100, 56), (5, 120, 3), (64, 64, 128)])]
    return pack_pairs(collate_pairs(examples, 0), budget)


@pytest.mark.parametrize("budget", [127, 128, 129, 255, 256, 257])
@pytest.mark.parametrize("window", [None, 5])
def test_flex_block_mask_per_token_at_block_boundaries(budget, window):
    """Token by token, flex attention with our BlockMask equals SDPA with the dense rule, and the
    mask's block sparsity (the blocks flex skips) never drops a key a query may see. Flex runs
    uncompiled here: torch's reference computation of the mask, the same on every CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    from sppo_lightning.packing import block_mask

    packed = flex_rows(budget)
    rows, length = packed.input_ids.shape
    blocks, dense = block_mask(packed, window), allowed(packed, window)
    # Every allowed (query, key) lies in a block the mask keeps, and every kept block is needed.
    size = blocks.BLOCK_SIZE[0]
    kept = blocks.to_dense()[:, 0].repeat_interleave(size, 1).repeat_interleave(size, 2)[:, :length, :length].bool()
    assert not (dense[:, 0] & ~kept).any()
    q_blocks = -(-length // size)
    for r in range(rows):
        for i in range(q_blocks):
            for j in range(q_blocks):
                needed = dense[r, 0, i * size:(i + 1) * size, j * size:(j + 1) * size].any()
                assert bool(kept[r, i * size, j * size]) == bool(needed), (r, i, j)
    g = torch.Generator().manual_seed(budget)
    q, k, v = (torch.randn(rows, 2, length, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        got = flex_attention(q, k, v, block_mask=blocks)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    real = packed.pair >= 0  # padding may see nothing but itself: not compared
    torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], rtol=0, atol=1e-5)


def test_flex_attention_is_never_packed_on_cpu():
    """Packing with flex attention is for CUDA. On CPU torch has no backward for it, and its compiled
    CPU kernel is wrong on AVX2 (torch 2.13: inductor's simdlen 256 turns two tokens of a
    4-token pair in a padded row into NaN; 0.078 nats off on an AMD EPYC): auto pads there with
    one line, and true is one ConfigError."""
    model, batch = model_of("mistral", "flex_attention"), collate_pairs(EXAMPLES, 0)
    reason = packing_unsupported(model)
    assert "flex_attention on CPU cannot train" in reason and "AVX2" in reason
    assert resolve_packing("auto", BUDGET, model) is None
    with pytest.raises(ConfigError, match="flex_attention on CPU"):
        resolve_packing(True, BUDGET, model)
    masks = attention_masks(pack_pairs(batch, BUDGET), model.config, torch.float32)
    assert type(masks).__name__ == "BlockMask"  # what a CUDA run hands the model


def test_alternating_windows_get_one_mask_per_kind():
    config = CONFIGS["gemma2"]()
    config._attn_implementation = "eager"
    masks = attention_masks(pack_pairs(collate_pairs(EXAMPLES, 0), BUDGET), config, torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert masks["full_attention"].dtype == torch.float32  # eager adds its mask: 0 or the dtype's minimum
    assert (masks["sliding_attention"] < 0).sum() > (masks["full_attention"] < 0).sum()


def module_grads(module, batch):
    module.policy.zero_grad()
    per_pair, _ = module.step(batch)
    per_pair.mean().backward()
    return {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    from sppo_lightning.testing import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("models") / "llama64", hidden_size=64))


@pytest.mark.parametrize("footprint", ["lora", "qlora", "checkpointing"])
def test_modules_train_the_same_packed_as_padded(llama64, footprint):
    """PreferenceModule's SPPO step, packed (the default) against padded: LoRA, QLoRA (4-bit base
    on CPU, checkpointing on) and full weights with gradient checkpointing."""
    from sppo_lightning.models import LoraSettings
    from sppo_lightning.module import PreferenceModule

    settings = dict(loss="sppo", eta=10.0, reference="cached")
    if footprint == "checkpointing":
        settings["gradient_checkpointing"] = True
    else:
        settings.update(footprint=footprint, lora=LoraSettings(r=4, alpha=8), reference="adapter")
    torch.manual_seed(0)
    module = PreferenceModule(llama64, **settings)
    module.configure_model()
    assert module.hparams["packing"] is True and module.pack_budget == 2048
    batch = collate_pairs([dict(ex, reference_chosen_logps=-30.0, reference_rejected_logps=-31.0) for ex in EXAMPLES], 0)
    packed = module_grads(module, batch)
    module.pack_budget = None
    padded = module_grads(module, batch)
    assert_same_grads(padded, packed)


def test_packing_true_on_a_model_that_cannot_pack_is_one_line():
    model = torch.nn.Linear(2, 2)
    assert "not a Hugging Face model" in packing_unsupported(model)
    with pytest.raises(ConfigError, match=r"model.packing: true, but Linear is not a Hugging Face model; set "
                                          r"model.packing: auto"):
        resolve_packing(True, 4096, model)
    assert resolve_packing(False, 4096, model_of("llama", "sdpa")) is None


def test_packing_auto_falls_back_with_one_info_line(caplog):
    """Gemma-2 soft-caps its attention scores, which sdpa cannot: auto runs padded and says why."""
    model = model_of("gemma2", "eager")
    model.config._attn_implementation = "sdpa"  # as a user forcing sdpa would have it
    with caplog.at_level(logging.INFO):
        assert resolve_packing("auto", 4096, model) is None
    assert "model.packing auto: padded batches, because sdpa cannot soft-cap attention scores" in caplog.text
    model.config._attn_implementation = "flash_attention_2"
    assert "takes no custom attention mask" in packing_unsupported(model)
    assert resolve_packing("auto", 2048, model_of("gemma2", "eager")) == 2048


def test_length_grouped_batches_are_a_seeded_permutation_of_similar_lengths():
    import statistics

    from sppo_lightning.datamodules.shuffle import EpochShuffle, LengthGroupedShuffle

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 1000, (203,), generator=g).tolist()
    grouped = LengthGroupedShuffle(lengths, batch_size=4, seed=3, epoch=lambda: 1, group=8)
    order = list(grouped)
    assert sorted(order) == list(range(203)) and order == list(grouped)  # a permutation, fixed by (seed, epoch)
    assert order != list(LengthGroupedShuffle(lengths, 4, 3, lambda: 2, 8))  # another epoch, another order
    assert len(set(order[-3:])) == 3 and order[-3:] == list(grouped)[-3:]  # the short batch stays last

    def spread(sequence):
        return statistics.mean(max(lengths[i] for i in sequence[b:b + 4]) - min(lengths[i] for i in sequence[b:b + 4])
                               for b in range(0, 200, 4))

    assert spread(order) < 0.25 * spread(list(EpochShuffle(203, 3, lambda: 1)))
