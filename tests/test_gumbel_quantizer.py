import pytest
import torch

from speechlab.models.unispeech import UniSpeechConfig
from speechlab.nn.gumbel_quantizer import GumbelProductQuantizer, gumbel_temperature


def _quantizer(**overrides) -> GumbelProductQuantizer:
    torch.manual_seed(0)
    return GumbelProductQuantizer(16, num_groups=2, num_entries=8, codevector_dim=12, **overrides)


def test_temperature_schedule_decays_per_step_and_stops_at_minimum():
    assert gumbel_temperature(0, 2.0, 0.5, 0.999995) == 2.0
    assert gumbel_temperature(1000, 2.0, 0.5, 0.999995) == pytest.approx(2.0 * 0.999995**1000)
    assert gumbel_temperature(10_000_000, 2.0, 0.5, 0.999995) == 0.5
    quantizer = _quantizer(temperature=(2.0, 0.1, 0.99))
    assert quantizer.set_step(100) == pytest.approx(2.0 * 0.99**100)
    assert quantizer.temperature == pytest.approx(2.0 * 0.99**100)


def test_eval_selects_argmax_entry_of_each_group_and_concatenates():
    quantizer = _quantizer().eval()
    features = torch.randn(3, 5, 16)
    out = quantizer(features)
    logits = quantizer.weight_proj(features).view(3, 5, 2, 8)
    assert torch.equal(out.indices, logits.argmax(-1))
    codebook = quantizer.codevectors.view(2, 8, 6)
    expected = torch.cat([codebook[0][out.indices[..., 0]], codebook[1][out.indices[..., 1]]], dim=-1)
    assert out.codevectors.shape == (3, 5, 12)
    torch.testing.assert_close(out.codevectors, expected, rtol=0, atol=0)


def test_training_output_is_one_hot_forward_with_gradient_to_logits():
    quantizer = _quantizer().train()
    features = torch.randn(4, 7, 16)
    out = quantizer(features, generator=torch.Generator().manual_seed(1))
    codebook = quantizer.codevectors.view(2, 8, 6)
    # forward values are exactly codebook entries (hard straight-through)
    expected = torch.cat([codebook[0][out.indices[..., 0]], codebook[1][out.indices[..., 1]]], dim=-1)
    torch.testing.assert_close(out.codevectors, expected, rtol=0, atol=1e-6)
    out.codevectors.sum().backward()
    assert quantizer.weight_proj.weight.grad is not None
    assert quantizer.weight_proj.weight.grad.abs().sum() > 0


def test_training_samples_depend_on_generator_seed_only():
    quantizer = _quantizer().train()
    features = torch.randn(2, 50, 16)
    a = quantizer(features, generator=torch.Generator().manual_seed(3)).indices
    b = quantizer(features, generator=torch.Generator().manual_seed(3)).indices
    c = quantizer(features, generator=torch.Generator().manual_seed(4)).indices
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_low_temperature_gumbel_sampling_approaches_argmax():
    quantizer = _quantizer().train()
    quantizer.temperature = 1e-4
    features = torch.randn(2, 40, 16) * 10
    sampled = quantizer(features, generator=torch.Generator().manual_seed(0)).indices
    argmax = quantizer.eval()(features).indices
    # Gumbel noise still changes a few near-ties, but most frames keep the argmax entry.
    assert (sampled == argmax).float().mean() > 0.5


def test_perplexity_counts_uniform_usage_and_ignores_padded_frames():
    quantizer = _quantizer().eval()
    with torch.no_grad():
        quantizer.weight_proj.weight.zero_()
        quantizer.weight_proj.bias.zero_()
    out = quantizer(torch.randn(2, 3, 16))
    # all logits equal: soft distribution uniform -> perplexity V per group
    assert out.prob_perplexity.item() == pytest.approx(2 * 8)
    # padded frames (valid_mask False) must not move the perplexity
    torch.manual_seed(0)
    quantizer = _quantizer().eval()
    features = torch.randn(1, 6, 16)
    valid = torch.tensor([[True, True, True, False, False, False]])
    padded = features.clone()
    padded[:, 3:] = 100 * torch.randn(1, 3, 16)
    a = quantizer(features, valid)
    b = quantizer(padded, valid)
    c = quantizer(features[:, :3])
    torch.testing.assert_close(a.prob_perplexity, b.prob_perplexity)
    torch.testing.assert_close(a.prob_perplexity, c.prob_perplexity)
    torch.testing.assert_close(a.code_perplexity, c.code_perplexity)
    assert 1.0 <= c.code_perplexity.item() <= 2 * 3  # at most one distinct entry per frame and group


@pytest.mark.parametrize(
    ("groups", "dim", "temperature", "message"),
    [
        (2, 7, (2.0, 0.1, 0.999995), "codevector_dim=7 must be divisible by the 2 codebook groups"),
        (2, 8, (2.0, 0.1), "temperature must be"),
        (2, 8, (0.1, 2.0, 0.999995), "0 < min <= max"),
        (2, 8, (2.0, 0.1, 1.5), "decay must be in"),
    ],
)
def test_quantizer_and_unispeech_config_reject_the_same_bad_arguments_by_name(
    groups, dim, temperature, message
):
    with pytest.raises(ValueError, match=f"GumbelProductQuantizer: .*{message}"):
        GumbelProductQuantizer(4, num_groups=groups, codevector_dim=dim, temperature=temperature)
    with pytest.raises(ValueError, match=f"UniSpeechConfig: .*{message}"):
        UniSpeechConfig(num_codevector_groups=groups, codevector_dim=dim, temperature=temperature)


def test_paper_defaults():
    quantizer = GumbelProductQuantizer(512)
    assert (quantizer.num_groups, quantizer.num_entries, quantizer.codevectors.shape) == (
        2,
        320,
        (1, 640, 384),
    )
    assert quantizer.schedule == (2.0, 0.1, 0.999995) and quantizer.temperature == 2.0
