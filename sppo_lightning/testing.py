"""Tiny offline models for tests, docs and the quickstart.

Nothing here downloads anything. ``make_tiny_llama(dir)`` trains a small byte-level BPE tokenizer
with the ``tokenizers`` library, gives it a chat template, builds a randomly initialised Llama of a
few hundred thousand parameters and saves both with ``save_pretrained``, so that every consumer
loads them back through the same ``from_pretrained`` path that real hub models take.

``make_tiny_pairrm(dir)`` builds a randomly initialised PairRM (DeBERTa-v2 backbone + llm-blender's
head) and saves it in both checkpoint layouts: llm-blender's own and the Hugging Face one.

Command line (used by the README quickstart)::

    python -m sppo_lightning.testing .tiny        # writes .tiny/llama and .tiny/pairrm*
    python -m sppo_lightning.testing .tiny --vllm # only .tiny/llama_vllm (head size 32, for vLLM on CPU)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sppo_lightning.ranking.judges import WORDS

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# Zephyr-style: one BOS, each turn closed by EOS. Responses therefore end in "</s>\n", which
# exercises the EOS-detection rule of the data pipeline (the EOS is inside the response part).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

def _corpus() -> list[str]:
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        idx = torch.randint(len(WORDS), (12,), generator=g).tolist()
        lines.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    lines += [f"What is {a} plus {b}? {a} plus {b} is {a + b}." for a in range(10) for b in range(10)]
    return lines


def _byte_level_bpe(special_tokens: list[str], unk_token: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (any unicode encodes) trained in memory on the tiny corpus."""
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def make_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """The tiny Llama's tokenizer, with a chat template, built in memory."""
    tok = _byte_level_bpe(SPECIAL_TOKENS, "<unk>", vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


_TOPICS = ["sky", "sun", "moon", "tree", "river", "city", "house", "cat", "dog", "bird", "water", "grass"]
_QUESTIONS = ["Tell me about the {}.", "What color is the {}?", "Write a short line about the {}.",
              "Why is the {} good?", "Explain the {} in simple words.", "Say something about the {}."]


def sft_conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Synthetic chats for the warm-up: a question about a topic, answered with a sentence of
    words from the tiny vocabulary that mentions the topic."""
    g = torch.Generator().manual_seed(seed)
    chats = []
    for _ in range(n):
        topic = _TOPICS[int(torch.randint(len(_TOPICS), (1,), generator=g))]
        question = _QUESTIONS[int(torch.randint(len(_QUESTIONS), (1,), generator=g))].format(topic)
        length = int(torch.randint(4, 12, (1,), generator=g))
        words = [WORDS[i] for i in torch.randint(len(WORDS), (length,), generator=g).tolist()]
        words.insert(int(torch.randint(length, (1,), generator=g)), topic)
        answer = " ".join(words).capitalize() + "."
        chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return chats


def sft_warmup(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, steps: int, seed: int = 0) -> None:
    """A few hundred steps of supervised fine-tuning on ``sft_conversations`` (loss on the answers
    only), so that the random model writes word-like text instead of byte noise."""
    from sppo_lightning.data.rows import PreferenceRow
    from sppo_lightning.data.tokenize import collate_pairs, encode_row
    from sppo_lightning.logprobs import sequence_logprobs

    examples = []
    for chat in sft_conversations(512, seed):
        row = PreferenceRow(chat[:1], chat[1]["content"], chat[1]["content"] + " ", {}, {})
        examples.append(encode_row(tokenizer, row, max_length=96, max_prompt_length=48))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(examples), (32,), generator=g).tolist()
        batch = collate_pairs([examples[i] for i in idx], tokenizer.pad_token_id)
        half = batch["input_ids"].shape[0] // 2  # chosen rows only
        logits = model(input_ids=batch["input_ids"][:half], attention_mask=batch["attention_mask"][:half]).logits
        loss = -sequence_logprobs(logits, batch["labels"][:half]).mean.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def llama_config(tokenizer: PreTrainedTokenizerFast, vocab_size: Optional[int] = None, **shape: int) -> LlamaConfig:
    """A ``LlamaConfig`` of ``shape`` (hidden_size, num_hidden_layers, ...) that speaks ``tokenizer``:
    its BOS/EOS/PAD ids, untied embeddings, and ``vocab_size`` (default: the tokenizer's; the
    benchmarks pass a realistic 32k so that the LM head weighs what it does in real models)."""
    return LlamaConfig(vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False, **shape)


def make_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    sft_steps: int = 0,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> Path:
    """Save a tiny random Llama and its tokenizer to ``out_dir`` and return the path.

    ``sft_steps > 0`` first warms it up on synthetic chats (``sft_warmup``): the quickstart does,
    so that self-play starts from a policy that writes words. The head size is
    ``hidden_size / num_heads`` (8 by default); vLLM's CPU attention needs 32 or more
    (``hidden_size=64, num_heads=2``).
    """
    out_dir = Path(out_dir)
    tokenizer = make_tiny_tokenizer()
    config = llama_config(tokenizer, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                          max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if sft_steps:
        sft_warmup(model, tokenizer, sft_steps, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


PAIRRM_SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]


def make_tiny_pairrm_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A DeBERTa-style tokenizer: ``[CLS] text [SEP]`` around every text, byte-level BPE inside."""
    tok = _byte_level_bpe(PAIRRM_SPECIAL_TOKENS, "[UNK]", vocab_size)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        unk_token="[UNK]", mask_token="[MASK]", model_max_length=2048,
    )


def make_tiny_pairrm(
    out_dir: str | Path, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, seed: int = 0,
    initializer_range: float = 0.3, head_std: float = 0.5,
) -> tuple[Path, Path]:
    """Save one random PairRM twice: ``out_dir/pairrm`` (llm-blender layout, with its backbone in
    ``out_dir/pairrm-backbone``) and ``out_dir/pairrm-hf`` (``DebertaV2PairRM``). Same weights."""
    from safetensors.torch import save_model
    from transformers import DebertaV2Config, DebertaV2Model

    from sppo_lightning.ranking.pairrm import CANDIDATE, CANDIDATE1, CANDIDATE2, SOURCE, import_llm_blender

    import_llm_blender()
    from llm_blender.pair_ranker.config import RankerConfig
    from llm_blender.pair_ranker.pairrm import DebertaV2PairRM
    from llm_blender.pair_ranker.ranker import CrossCompareReranker

    out_dir = Path(out_dir).resolve()
    backbone_dir, blender_dir, hf_dir = out_dir / "pairrm-backbone", out_dir / "pairrm", out_dir / "pairrm-hf"
    tokenizer = make_tiny_pairrm_tokenizer()
    backbone_config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=2 * hidden_size, max_position_embeddings=512,
        relative_attention=True, position_buckets=64, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], pad_token_id=0, position_biased_input=False,
        norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0,
        # a wide init makes the candidate positions attend to their content strongly enough
        # that different responses get clearly different scores
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    DebertaV2Model(backbone_config).save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)

    tokenizer.add_tokens([SOURCE, CANDIDATE1, CANDIDATE2, CANDIDATE])
    backbone = DebertaV2Model.from_pretrained(backbone_dir)
    backbone.resize_token_embeddings(len(tokenizer))
    backbone.config.out_hidden_state_size = hidden_size
    ranker_config = RankerConfig(
        ranker_type="pairranker", model_type="deberta", model_name=str(backbone_dir),
        source_maxlength=1224, candidate_maxlength=412, n_tasks=1, drop_out=0.05, fp16=False,
    )
    ranker = CrossCompareReranker(backbone, ranker_config, tokenizer)
    # BERT-style init (std 0.02) makes every pair logit ~1e-5; larger head weights give logits of
    # order 1, so that parity tests at 1e-4 and rankings mean something.
    for layer in ranker.head_layer:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=head_std)
    blender_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in ranker_config.to_dict().items() if k not in ("cache_dir", "load_checkpoint", "device")}
    (blender_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_model(ranker, str(blender_dir / "model.safetensors"))

    hf_config = DebertaV2Config(**backbone.config.to_dict())
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("source_prefix_id", SOURCE), ("cand1_prefix_id", CANDIDATE1),
        ("cand2_prefix_id", CANDIDATE2), ("cand_prefix_id", CANDIDATE))}
    for key, value in dict(n_tasks=1, drop_out=0.05, sep_token_id=tokenizer.sep_token_id, **ids).items():
        setattr(hf_config, key, value)
    hf_model = DebertaV2PairRM(hf_config)
    hf_model.load_state_dict(ranker.state_dict(), strict=False)
    hf_model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return blender_dir, hf_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write; the model goes to <out_dir>/llama")
    parser.add_argument("--vllm", action="store_true",
                        help="write only <out_dir>/llama_vllm: the same tiny Llama with a head size of 32, "
                             "which vLLM's CPU attention needs (configs/vllm.yaml); the quickstart's models "
                             "in <out_dir> are left as they are")
    args = parser.parse_args(argv)
    if args.vllm:
        print(f"building the tiny Llama for vLLM in {Path(args.out_dir) / 'llama_vllm'} (300 warm-up steps) ...",
              flush=True)
        path = make_tiny_llama(Path(args.out_dir) / "llama_vllm", hidden_size=64, sft_steps=300, num_heads=2,
                               num_kv_heads=1)
        print(f"tiny llama for vLLM (head size 32) saved to {path}")
        return
    print(f"[1/2] building the tiny Llama and its BPE tokenizer in {Path(args.out_dir) / 'llama'} (300 warm-up "
          f"steps) ...", flush=True)
    path = make_tiny_llama(Path(args.out_dir) / "llama", hidden_size=64, sft_steps=300)
    print(f"tiny llama and tokenizer saved to {path}")
    print(f"[2/2] building the tiny PairRM (DeBERTa) in {args.out_dir} ...", flush=True)
    blender_dir, hf_dir = make_tiny_pairrm(args.out_dir)
    print(f"tiny PairRM saved to {blender_dir} (llm-blender layout) and {hf_dir} (Hugging Face layout)")


if __name__ == "__main__":
    main()
