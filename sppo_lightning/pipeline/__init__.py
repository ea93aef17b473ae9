"""The Trainer-free self-play stages and generators the methods (``sppo_lightning.methods``) are built from.

The stages take a ``DistContext`` instead of a Trainer, so they run (and are tested) in a plain script.
"""

from sppo_lightning.contracts import EngineGenerator, Generator
from sppo_lightning.distributed import DistContext
from sppo_lightning.pipeline.generators import HFGenerator
from sppo_lightning.pipeline.vllm_generator import VLLMGenerator

__all__ = ["DistContext", "EngineGenerator", "Generator", "HFGenerator", "VLLMGenerator"]
