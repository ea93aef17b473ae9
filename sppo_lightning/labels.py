"""The label of positions that carry no loss (prompt and padding), as Hugging Face's losses use it.

Collation writes it (``data/tokenize.py``), log-probs and packing read it: it lives below all three.
"""

IGNORE_INDEX = -100
