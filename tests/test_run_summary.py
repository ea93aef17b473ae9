"""run_summary.py: rows replaced by iteration, kept across restarts; a damaged file is kept aside
with one warning and the summary starts afresh."""

import json

import pytest

from sppo_lightning.run_summary import RunSummary


def test_rows_are_kept_across_restarts_and_replaced_by_iteration(tmp_path):
    path = tmp_path / "summary.json"
    summary = RunSummary(path)
    assert not summary.damaged
    summary.record({"iteration": 1, "loss": 0.5})
    summary.record_initial({"if_prompt_loose": 0.2})
    again = RunSummary(path)
    again.record({"iteration": 1, "loss": 0.4})
    again.record({"iteration": 2, "loss": 0.3})
    saved = json.loads(path.read_text())
    assert saved == {"iterations": [{"iteration": 1, "loss": 0.4}, {"iteration": 2, "loss": 0.3}],
                     "initial": {"if_prompt_loose": 0.2}}


@pytest.mark.parametrize("text, problem", [
    ('{"iterations": [{"iteration": 1, "lo', "not readable as JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"iterations": {"iteration": 1}}', "'iterations' is not a list"),
    ('{"iterations": [{"loss": 1.0}]}', "row 1 of 'iterations' has no integer 'iteration'"),
    ('{"iterations": [{"iteration": "1"}]}', "row 1 of 'iterations' has no integer 'iteration'"),
])
def test_a_damaged_summary_is_kept_aside_in_one_warning_and_the_run_goes_on(tmp_path, text, problem):
    path = tmp_path / "summary.json"
    path.write_text(text)
    with pytest.warns(UserWarning, match=f"summary.json: {problem}.*kept as summary.json.damaged, and the summary is "
                                         f"rebuilt from the iterations' own folders"):
        summary = RunSummary(path)
    assert summary.rows == [] and summary.initial == {} and summary.damaged
    assert (tmp_path / "summary.json.damaged").read_text() == text  # nothing lost
    summary.record({"iteration": 3, "loss": 0.1})
    assert json.loads(path.read_text())["iterations"] == [{"iteration": 3, "loss": 0.1}]
