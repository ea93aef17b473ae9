"""Markers shared by the data side and the training side, below both.

``IGNORE_INDEX``: the label of positions that carry no loss (prompt and padding), as Hugging Face's
losses use it. Collation writes it (``data/tokenize.py``), log-probs and packing read it.

``NO_PAIR``: a column set to 1 on the one placeholder row of a per-step draw whose prompts all tied
(``methods/online.py``): the training step sees it and skips the optimizer step, since Lightning
ends ``fit`` at an epoch without batches.
"""

IGNORE_INDEX = -100
NO_PAIR = "no_pair"
