import pytest
import torch

from speechlab.optim import OptimConfig, build_optimizer, lr_factor


def test_warmup_rises_linearly_then_linear_decay_reaches_min():
    config = OptimConfig(lr=1.0, warmup_steps=4, decay="linear", min_lr_ratio=0.1)
    factors = [lr_factor(step, config, total_steps=14) for step in range(15)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0)
    assert factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_cosine_decay_is_half_way_at_midpoint():
    config = OptimConfig(lr=1.0, warmup_steps=0, decay="cosine")
    assert lr_factor(50, config, total_steps=100) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "field,value", [("lr", -1e-3), ("warmup_steps", -1), ("min_lr_ratio", 2.0), ("decay", "step")]
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}"):
        OptimConfig(**{field: value})


def test_no_weight_decay_on_biases_and_norms_and_lr_scale_by_prefix():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    setup = build_optimizer(
        model.named_parameters(), OptimConfig(lr=1.0), total_steps=10, lr_scale={"2.": 0.5}
    )
    groups = setup["optimizer"].param_groups
    matrices = {id(model[0].weight), id(model[2].weight)}
    for group in groups:
        for p in group["params"]:
            assert (group["weight_decay"] > 0) == (id(p) in matrices)
    scaled = [g for g in groups if any(p is model[2].weight for p in g["params"])]
    assert scaled[0]["lr"] == pytest.approx(0.5 * (1 / 101))  # warm-up factor of step 0 applied by LambdaLR
