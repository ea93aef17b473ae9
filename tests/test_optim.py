"""optim.py: the optimizers by name and the linear warmup/decay schedule, against hand values."""

import pytest
import torch

from sppo_lightning.errors import ConfigError
from sppo_lightning.optim import make_optimizer


def lrs(warmup_ratio: float, total: int, steps: int) -> list[float]:
    params = [torch.nn.Parameter(torch.zeros(2))]
    config = make_optimizer(params, "adamw", lr=1.0, weight_decay=0.0, warmup_ratio=warmup_ratio, total_steps=total)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_rounds_up_as_hf_trainer_then_decays_linearly_to_zero():
    # 10 steps, ratio 0.25: ceil(2.5) = 3 warmup steps (0, 1/3, 2/3), then 1 falling by 1/7 a step to 0
    assert lrs(0.25, 10, 11) == pytest.approx([0, 1 / 3, 2 / 3, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0])


def test_a_schedule_all_warmup_keeps_one_step_after_it_with_a_warning():
    with pytest.warns(UserWarning, match="warmup shortened to 1 step"):
        assert lrs(1.0, 2, 2) == pytest.approx([0.0, 1.0])  # without it the only step would run at lr 0


def test_each_optimizer_by_name_and_an_unknown_one_in_one_line():
    params = [torch.nn.Parameter(torch.zeros(2))]
    rmsprop = make_optimizer(params, "rmsprop", 1e-3, 0.0, 0.0, 5)["optimizer"]
    assert isinstance(rmsprop, torch.optim.RMSprop) and rmsprop.defaults["alpha"] == 0.99  # torch's, as HF's rmsprop
    assert isinstance(make_optimizer(params, "adamw", 1e-3, 0.1, 0.0, 5)["optimizer"], torch.optim.AdamW)
    frozen = [torch.nn.Parameter(torch.zeros(2), requires_grad=False), *params]
    assert len(make_optimizer(frozen, "adamw", 1e-3, 0.0, 0.0, 5)["optimizer"].param_groups[0]["params"]) == 1
    with pytest.raises(ConfigError, match="model.optimizer must be rmsprop, adamw, adamw_8bit or paged_adamw_8bit"):
        make_optimizer(params, "sgd", 1e-3, 0.0, 0.0, 5)
