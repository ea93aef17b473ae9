import json

import pytest

from sppo_lightning.data.prompts import load_prompts
from sppo_lightning.errors import DataError


def write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_strings_and_conversations(tmp_path, tokenizer):
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    prompts, truncated, skipped = load_prompts(
        write(tmp_path, [{"prompt": "Name a color."}, {"prompt": conversation}]), tokenizer, 64)
    assert [p.index for p in prompts] == [0, 1]
    assert prompts[0].messages == [{"role": "user", "content": "Name a color."}]
    assert prompts[1].text == "Hi there"  # the ranker reads the turns, not the system prompt
    assert tokenizer.decode(prompts[0].ids).endswith("<|assistant|>\n")
    assert prompts[0].ids.count(tokenizer.bos_token_id) == 1
    assert (truncated, skipped) == (0, [])


def test_long_prompts_keep_their_end_and_are_counted(tmp_path, tokenizer):
    prompts, truncated, _ = load_prompts(write(tmp_path, [{"prompt": "word " * 200 + "END"}]), tokenizer, 16)
    assert truncated == 1 and len(prompts[0].ids) == 16
    assert prompts[0].ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(prompts[0].ids).endswith("END</s>\n<|assistant|>\n")


@pytest.mark.parametrize("rows, message", [
    ([], "no prompts"),
    ([{"question": "x"}], "missing column 'prompt'"),
    ([{"prompt": "ok"}, {"prompt": "   "}], "row 2: column 'prompt': empty prompt"),
    ([{"prompt": "ok"}, {"prompt": 5}], "row 2: column 'prompt': expected a string or a list"),
    ([{"prompt": [{"role": "assistant", "content": "x"}]}], "row 1: column 'prompt': the last turn must be"),
])
def test_bad_prompt_files(tmp_path, tokenizer, rows, message):
    with pytest.raises(DataError, match=message):
        load_prompts(write(tmp_path, rows), tokenizer, 64)


def test_skip_bad_rows(tmp_path, tokenizer):
    prompts, _, skipped = load_prompts(
        write(tmp_path, [{"prompt": "ok"}, {"prompt": ""}, {"prompt": "fine"}]), tokenizer, 64, skip_bad_rows=True)
    assert [p.index for p in prompts] == [0, 2] and len(skipped) == 1
