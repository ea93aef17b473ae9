"""Judges for ``FunctionJudge`` in the tests' runs (named ``tests.judges:<name>`` in a config)."""


def first_step_only(prompt: str, response: str) -> float:
    """Prefers shorter answers to the tiny prompt file's third prompt (online step 1's), and ties every
    other answer: step 1 trains on one pair, and step 2's prompts all tie."""
    return -float(len(response)) if "house in simple words" in prompt else 0.0
