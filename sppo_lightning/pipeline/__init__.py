"""The Trainer-free self-play pipeline: generators, stages, and SPPO's iteration builder.

``SelfPlayDataModule`` owns a pipeline and calls ``build`` in ``train_dataloader``; the stages take
a ``DistContext`` instead of a Trainer, so they run (and are tested) in a plain script.
"""

from sppo_lightning.distributed import DistContext
from sppo_lightning.pipeline.generators import Generator, HFGenerator
from sppo_lightning.pipeline.sppo import TRAINING_COLUMNS, IterationData, SPPOPipeline
from sppo_lightning.pipeline.vllm_generator import VLLMGenerator

__all__ = ["DistContext", "Generator", "HFGenerator", "IterationData", "SPPOPipeline", "TRAINING_COLUMNS",
           "VLLMGenerator"]
