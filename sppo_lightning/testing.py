"""Tiny offline models for tests, docs and the quickstart.

Nothing here downloads anything. ``make_tiny_llama(dir)`` trains a small byte-level BPE tokenizer
with the ``tokenizers`` library, gives it a chat template, builds a randomly initialised Llama of a
few hundred thousand parameters and saves both with ``save_pretrained``, so that every consumer
loads them back through the same ``from_pretrained`` path that real hub models take.

Command line (used by the README quickstart)::

    python -m sppo_lightning.testing .tiny        # writes .tiny/llama
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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

_WORDS = (
    "the a an is are was be to of and in that it for on with as at by this from or not but what "
    "which who how why when where can could would should will do does did has have had you your "
    "we our they their he she his her i me my yes no one two three four five six seven eight nine "
    "ten plus minus times equals answer question number color sky blue green red sun moon water "
    "cat dog bird tree house city river good bad best better worse help please thank sure sorry "
    "know think say tell give make write explain short long simple because so then than more less"
).split()


def _corpus() -> list[str]:
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        idx = torch.randint(len(_WORDS), (12,), generator=g).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx).capitalize() + ".")
    lines += [f"What is {a} plus {b}? {a} plus {b} is {a + b}." for a in range(10) for b in range(10)]
    return lines


def make_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any unicode encodes) with a chat template, built in memory."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def make_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a tiny random Llama and its tokenizer to ``out_dir`` and return the path."""
    out_dir = Path(out_dir)
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write; the model goes to <out_dir>/llama")
    args = parser.parse_args(argv)
    path = make_tiny_llama(Path(args.out_dir) / "llama")
    print(f"tiny llama and tokenizer saved to {path}")


if __name__ == "__main__":
    main()
