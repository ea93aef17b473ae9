import json
import math

import datasets
import pytest
import torch

from sppo_lightning.data import DataError
from sppo_lightning.datamodules import PreferenceDataModule
from sppo_lightning.data.rows import load_records, parse_rows
from sppo_lightning.data.tokenize import collate_pairs, encode_prompt, encode_row, truncate
from sppo_lightning.errors import ConfigError


def conv(prompt, response):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def sppo_record(prompt="What is 1 plus 1?", chosen="2.", rejected="3.", **extra):
    record = {
        "chosen": conv(prompt, chosen),
        "rejected": conv(prompt, rejected),
        "chosen_probs": 0.9,
        "chosen_probs_win": 0.7,
        "chosen_probs_lose": 0.3,
    }
    record.update(extra)
    return record


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------------------- formats
def test_sppo_pair_format_is_normalised():
    rows, skipped = parse_rows([sppo_record()], "mem")
    (row,) = rows
    assert row.prompt == [{"role": "user", "content": "What is 1 plus 1?"}]
    assert (row.chosen, row.rejected) == ("2.", "3.")
    assert row.probs == {"chosen_probs": 0.9, "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3}
    assert skipped == []


def test_plain_string_format_is_normalised():
    (row,), _ = parse_rows([{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}], "mem")
    assert row.prompt == [{"role": "user", "content": "Hi?"}]
    assert (row.chosen, row.rejected, row.probs) == ("Hello.", "Go away.", {})


def test_multi_turn_conversation_keeps_earlier_turns():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
    ]
    record = {
        "chosen": history + [{"role": "assistant", "content": "4"}],
        "rejected": history + [{"role": "assistant", "content": "5"}],
    }
    (row,), _ = parse_rows([record], "mem")
    assert row.prompt == history


# ---------------------------------------------------------------------------- templating
def test_chat_template_gives_one_bos_and_one_eos(tokenizer):
    row = parse_rows([sppo_record()], "mem")[0][0]
    ex = encode_row(tokenizer, row, max_length=128, max_prompt_length=64)
    ids = ex["prompt_ids"] + ex["chosen_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1, "double BOS"
    assert ex["chosen_ids"].count(tokenizer.eos_token_id) == 1, "response must end its turn once"
    # The prompt ends with the generation prompt, so training and sampling see the same prefix.
    assert tokenizer.decode(ex["prompt_ids"]).endswith("<|assistant|>\n")
    assert tokenizer.decode(ex["chosen_ids"]).startswith("2.")


def test_eos_is_appended_when_the_template_does_not_close_the_turn(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    row = parse_rows([sppo_record()], "mem")[0][0]
    ex = encode_row(tok, row, max_length=128, max_prompt_length=64)
    assert ex["chosen_ids"][-1] == tok.eos_token_id
    assert ex["chosen_ids"].count(tok.eos_token_id) == 1


def test_truncation_keeps_prompt_end_and_bos_then_cuts_responses():
    prompt = [1] + list(range(100, 120))  # BOS + 20 tokens
    chosen, rejected = list(range(200, 230)), list(range(300, 310))
    p, c, r = truncate(prompt, chosen, rejected, max_length=40, max_prompt_length=8, bos_token_id=1)
    assert p == [1] + list(range(113, 120))  # BOS kept, then the last 7 prompt tokens
    assert c == chosen[:32] and r == rejected  # 40 - 8 = 32 tokens left for each response
    # nothing changes when it fits
    assert truncate(prompt, chosen, rejected, 100, 8, 1) == (prompt, chosen, rejected)


def test_over_long_rows_are_truncated_to_max_length(tokenizer):
    row = parse_rows([sppo_record(prompt="long " * 400, chosen="yes " * 300)], "mem")[0][0]
    ex = encode_row(tokenizer, row, max_length=64, max_prompt_length=32)
    assert len(ex["prompt_ids"]) == 32 and ex["prompt_ids"][0] == tokenizer.bos_token_id
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == 64
    assert encode_prompt(tokenizer, row.prompt)[-3:] == ex["prompt_ids"][-3:]


def test_collate_concatenates_chosen_then_rejected():
    examples = [
        {"prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 8, 2], "chosen_probs_win": 0.7},
        {"prompt_ids": [1, 6, 6], "chosen_ids": [9, 2], "rejected_ids": [4, 2], "chosen_probs_win": 0.6},
    ]
    batch = collate_pairs(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 5, 7, 2, 0], [1, 6, 6, 9, 2], [1, 5, 8, 8, 2], [1, 6, 6, 4, 2],
    ]
    assert batch["labels"].tolist() == [
        [-100, -100, 7, 2, -100], [-100, -100, -100, 9, 2],
        [-100, -100, 8, 8, 2], [-100, -100, -100, 4, 2],
    ]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]
    assert batch["chosen_probs_win"].dtype == torch.float64
    assert "chosen_probs_lose" not in batch


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved", "saved_dict"])
def test_every_local_source_loads(tmp_path, kind):
    records = [sppo_record(), sppo_record(prompt="Name a color.", chosen="Blue.", rejected="Idk.")]
    if kind == "jsonl":
        source = write_jsonl(tmp_path / "d.jsonl", records)
    elif kind == "json":
        source = tmp_path / "d.json"
        source.write_text(json.dumps(records))
    elif kind == "parquet":
        source = tmp_path / "d.parquet"
        datasets.Dataset.from_list(records).to_parquet(str(source))
    elif kind == "saved":
        source = tmp_path / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(source))
    else:
        source = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(source))
    rows, _ = parse_rows(load_records(str(source), "train"), str(source))
    assert [r.chosen for r in rows] == ["2.", "Blue."]


def test_missing_split_names_the_splits(tmp_path):
    source = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([sppo_record()])}).save_to_disk(str(source))
    with pytest.raises(DataError, match=r"no split 'test'; it has \['train'\]"):
        load_records(str(source), "test")


def test_hub_name_fails_with_one_clear_message():
    with pytest.raises(DataError) as info:
        load_records("UCLA-AGI/data-mistral-7b-instruct-sppo-iter1", "train")
    message = str(info.value)
    assert message.startswith("UCLA-AGI/data-mistral-7b-instruct-sppo-iter1: not a local file or folder")
    assert "hub" in message and "\n" not in message


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_records(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_byte_order_mark_is_read_and_bytes_that_are_not_text_are_one_line(tmp_path, suffix):
    record = sppo_record()
    path = tmp_path / f"bom.{suffix}"
    text = json.dumps(record) + "\n" if suffix == "jsonl" else json.dumps([record])
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # what Windows editors write first
    assert load_records(str(path)) == [record]
    noise = tmp_path / f"noise.{suffix}"
    noise.write_bytes(json.dumps(record).encode() + b"\n\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match=rf"noise.{suffix}: line 2: not UTF-8 text \(byte 0xff at offset"):
        load_records(str(noise))


def test_broken_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(sppo_record()) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: invalid JSON"):
        load_records(str(path))


def test_missing_column_names_file_and_column():
    with pytest.raises(DataError, match=r"f.jsonl: missing column\(s\) \['rejected'\]"):
        parse_rows([{"chosen": conv("q", "a")}], "f.jsonl")
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt'\]"):
        parse_rows([{"chosen": "a", "rejected": "b"}], "f.jsonl")


@pytest.mark.parametrize(
    "record, column, problem",
    [
        (sppo_record(chosen="   "), "chosen", "empty response"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty text"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty text"),
        (sppo_record(chosen_probs_win=1.5), "chosen_probs_win", "outside"),
        (sppo_record(chosen_probs_lose=-0.1), "chosen_probs_lose", "outside"),
        (sppo_record(chosen_probs=math.nan), "chosen_probs", "not finite"),
        (sppo_record(chosen_probs="0.5"), "chosen_probs", "expected a number"),
        (sppo_record(chosen="same", rejected="same"), "rejected", "identical"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
        ({"chosen": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}],
          "rejected": conv("q", "b")}, "chosen", "role 'bot'"),
        ({"chosen": conv("q", "a")[:1] + [{"role": "user", "content": "a"}],
          "rejected": conv("q", "b")}, "chosen", "last turn must be the assistant"),
        ({"chosen": conv("q1", "a"), "rejected": conv("q2", "b")}, "rejected", "differ"),
        (sppo_record(reference_chosen_logps=3.0, reference_rejected_logps=-1.0),
         "reference_chosen_logps", "outside"),
    ],
)
def test_bad_rows_name_file_row_and_column(record, column, problem):
    good = sppo_record() if isinstance(record["chosen"], list) else {"prompt": "q", "chosen": "a", "rejected": "b"}
    if "reference_chosen_logps" in record:
        good.update(reference_chosen_logps=-1.0, reference_rejected_logps=-2.0)
    with pytest.raises(DataError) as info:
        parse_rows([good, record], "data.jsonl")
    message = str(info.value)
    assert message.startswith(f"data.jsonl: row 2: column '{column}': ")
    assert problem in message


def test_skip_bad_rows_keeps_the_good_ones_and_counts():
    records = [sppo_record(), sppo_record(chosen_probs_win=2.0), sppo_record(chosen="x", rejected="x")]
    rows, skipped = parse_rows(records, "d.jsonl", skip_bad_rows=True)
    assert len(rows) == 1 and len(skipped) == 2
    assert skipped[0].startswith("d.jsonl: row 2: column 'chosen_probs_win'")


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        parse_rows(load_records(str(path)), str(path))


# ---------------------------------------------------------------------------- data module
def test_datamodule_serves_concatenated_batches(tmp_path, tiny_llama):
    records = [sppo_record(prompt=f"What is {i} plus 1?", chosen=f"{i + 1}.", rejected="no") for i in range(5)]
    dm = PreferenceDataModule(
        train_data=write_jsonl(tmp_path / "t.jsonl", records), tokenizer=tiny_llama, batch_size=2
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    assert batch["chosen_probs_win"].shape == (2,)
    assert len(dm.train_dataloader()) == 3
    assert dm.val_dataloader() == []


def test_datamodule_skip_bad_rows_warns_with_count(tmp_path, tiny_llama):
    records = [sppo_record(), sppo_record(chosen_probs=-1.0), sppo_record(chosen="2", rejected="2")]
    dm = PreferenceDataModule(
        train_data=write_jsonl(tmp_path / "t.jsonl", records), tokenizer=tiny_llama, skip_bad_rows=True
    )
    with pytest.warns(UserWarning, match="skipped 2 bad row"):
        dm.setup("fit")
    assert len(dm.train_examples) == 1


def test_impossible_lengths_are_a_config_error():
    with pytest.raises(ConfigError, match="max_prompt_length"):
        PreferenceDataModule(train_data="x.jsonl", max_length=64, max_prompt_length=64).setup("fit")
    with pytest.raises(ConfigError, match="batch_size"):
        PreferenceDataModule(train_data="x.jsonl", batch_size=0).setup("fit")


def test_a_prompt_row_without_its_column_says_missing(tmp_path, tokenizer):
    from sppo_lightning.data.prompts import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"question": "Why?"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl: row 2: column 'prompt': missing \(this row has 'question'\)"):
        load_prompts(str(path), tokenizer, 32)
