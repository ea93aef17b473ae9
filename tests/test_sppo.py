"""methods/sppo.py: its settings checked in one line each, and which generators sample π_t from an
export. Its iterations end to end are in test_pipeline.py (Trainer-free) and test_self_play.py."""

import pytest

from sppo_lightning.errors import ConfigError
from sppo_lightning.methods import SPPO
from sppo_lightning.methods.sppo import exports_policy
from sppo_lightning.pipeline import HFGenerator, VLLMGenerator
from sppo_lightning.ranking import FunctionJudge

JUDGE = FunctionJudge("sppo_lightning.ranking.judges:shorter")


@pytest.mark.parametrize("settings, message", [
    ({"num_samples": 1}, "data.method.num_samples \\(K\\) must be at least 2 to form a pair, got 1"),
    ({"generation_shard_size": 0}, "generation_shard_size must be at least 1, got 0"),
    ({"reference_batch_size": 0}, "batch sizes must be at least 1"),
    ({"num_samples": 2.5}, "num_samples must be an integer, got 2.5"),
])
def test_settings_are_checked_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        SPPO(JUDGE, **settings)


def test_the_defaults_are_the_official_pipeline_s():
    sppo = SPPO(JUDGE)
    assert (sppo.num_samples, sppo.restarts_optimizer, sppo.caches_reference) == (5, True, True)
    assert isinstance(sppo.generator, HFGenerator)


def test_only_an_engine_that_is_not_live_samples_from_an_export():
    assert not exports_policy(HFGenerator(), policy=None)
    assert exports_policy(VLLMGenerator(live=False), policy=None)
