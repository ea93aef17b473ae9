"""Random and malformed preference rows, prompt rows and JSONL files: every case ends in valid rows
or in our DataError naming the source, row and column; never another exception."""

import json
import math
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sppo_lightning.data.prompts import load_prompts
from sppo_lightning.data.rows import DataError, load_records, parse_rows
from sppo_lightning.data.tokenize import encode_row

CASES = 300  # per test below; the README quotes the total

text = st.one_of(st.text(max_size=40), st.text(alphabet="日本語🙂\u200b\x00é", max_size=20), st.just(""),
                 st.just("   "), st.text(min_size=2000, max_size=2500))
number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.booleans())
scalar = st.one_of(st.none(), text, number, st.lists(st.integers(), max_size=3))
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]), "content": scalar})
conversation = st.one_of(st.lists(message, max_size=4), scalar)
record = st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "chosen_probs", "chosen_probs_win", "chosen_probs_lose",
                     "reference_chosen_logps", "reference_rejected_logps", "extra"]),
    st.one_of(conversation, number, text), max_size=8,
)

# Well-formed rows with hostile contents, so that valid rows reach the tokenizer too.
plain = st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text})
paired = st.builds(
    lambda p, c, r, w, l: {"chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                           "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                           "chosen_probs_win": w, "chosen_probs_lose": l},
    text, text, text, number, number,
)
row = st.one_of(record, plain, paired)

ERROR = re.compile(r"^src\.jsonl: (row \d+: column '[a-z_]+': .+|missing column\(s\) .+|no rows|every row is bad.+)$",
                   re.S)


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(row, min_size=0, max_size=5), st.booleans())
def test_preference_rows(records, skip):
    try:
        rows, skipped = parse_rows(records, "src.jsonl", skip_bad_rows=skip)
    except DataError as err:
        assert ERROR.match(str(err)), str(err)
        return
    for row in rows:  # what passes is usable
        assert row.chosen.strip() and row.rejected.strip() and row.chosen != row.rejected
        assert all(0 <= p <= 1 for p in row.probs.values())
        assert all(math.isfinite(v) and v <= 0 for v in row.reference.values())


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(plain, paired), min_size=1, max_size=3))
def test_valid_rows_tokenize(tokenizer, records):
    try:
        rows, _ = parse_rows(records, "src.jsonl", skip_bad_rows=True)
    except DataError:
        return
    for row in rows:
        ex = encode_row(tokenizer, row, max_length=64, max_prompt_length=32)
        assert len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= 64
        assert ex["chosen_ids"] and ex["rejected_ids"]


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=30), st.builds(json.dumps, row),
                          st.builds(lambda t: json.dumps({"prompt": t}), text)), max_size=5))
def test_jsonl_files_and_prompt_files(tmp_path_factory, tokenizer, lines):
    path = tmp_path_factory.mktemp("fuzz") / "src.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        load_prompts(str(path), tokenizer, 32)
    except DataError as err:
        assert str(err).startswith(str(path)), str(err)
    try:
        parse_rows(load_records(str(path)), str(path))
    except DataError as err:
        assert str(err).startswith(str(path)), str(err)
