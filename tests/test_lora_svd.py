"""The linear algebra of the LoRA tools, on random modules: no model, milliseconds.

Every check compares ΔW matrices computed independently (float64 products, torch.linalg.svdvals),
so a bug in the QR/SVD shortcut cannot hide behind itself.
"""

from __future__ import annotations

import pytest
import torch

from core.lora.svd import (
    LoraModule,
    choose_rank,
    combine_modules,
    lowrank_svd,
    module_from_delta,
    resize_module,
)


def _module(name: str, out: int, inp: int, rank: int, alpha: float, kernel: tuple[int, ...] = (), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, inp, *kernel, generator=generator)
    up = torch.randn(out, rank, *(1 for _ in kernel), generator=generator)
    return LoraModule(name, down, up, alpha)


def _delta64(module: LoraModule) -> torch.Tensor:
    """ΔW as a float64 (out, in·kh·kw) matrix straight from the definition (alpha / rank)·up @ down."""
    up = module.up.to(torch.float64).reshape(module.up.shape[0], -1)
    down = module.down.to(torch.float64).reshape(module.rank, -1)
    return module.alpha / module.rank * up @ down


MODULES = [
    _module("lora_unet_linear", 24, 16, 6, 3.0, seed=1),
    _module("lora_unet_conv", 12, 8, 5, 5.0, kernel=(3, 3), seed=2),
    _module("lora_unet_wide", 4, 40, 7, 1.0, seed=3),  # rank above out: ΔW has rank 4 at most
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_lowrank_svd_is_the_svd_of_the_product(module: LoraModule) -> None:
    u, s, vh = lowrank_svd(*module.factors())
    expected = torch.linalg.svdvals(_delta64(module))
    torch.testing.assert_close(s, expected[: s.numel()], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u * s @ vh, _delta64(module), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_resize_to_full_rank_is_lossless(module: LoraModule) -> None:
    resized, stats = resize_module(module, rank=module.rank)
    assert stats.new_rank == min(module.rank, *_delta64(module).shape)
    assert stats.energy == pytest.approx(1.0)
    assert resized.alpha == resized.rank and resized.weight_shape == module.weight_shape
    assert resized.down.shape[1:] == module.down.shape[1:] and resized.up.shape[2:] == module.up.shape[2:]
    torch.testing.assert_close(_delta64(resized), _delta64(module), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_lower_rank_error_is_the_discarded_singular_values(module: LoraModule, rank: int) -> None:
    resized, stats = resize_module(module, rank=rank)
    sigma = torch.linalg.svdvals(_delta64(module))
    error = float(((_delta64(resized) - _delta64(module)) ** 2).sum())
    discarded = float((sigma[rank:] ** 2).sum())
    assert error == pytest.approx(discarded, rel=1e-5)
    assert stats.energy == pytest.approx(1 - discarded / float((sigma**2).sum()), rel=1e-9)
    assert (stats.old_rank, stats.new_rank) == (module.rank, rank)


def test_energy_threshold_picks_the_smallest_rank_reaching_it() -> None:
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0])  # σ² shares 16/22, 4/22, 1/22, 1/22
    assert choose_rank(sigma, energy=16 / 22) == 1
    assert choose_rank(sigma, energy=16 / 22 + 1e-6) == 2
    assert choose_rank(sigma, energy=0.95) == 3
    assert choose_rank(sigma, energy=1.0) == 4
    assert choose_rank(sigma, rank=9) == 4  # never more than there is
    assert choose_rank(torch.zeros(3), energy=0.9) == 1  # a zero ΔW keeps a (zero) rank-1 module
    module = MODULES[0]
    _, stats = resize_module(module, energy=0.9)
    shares = torch.cumsum(torch.linalg.svdvals(_delta64(module)) ** 2, 0)
    shares /= shares[-1].clone()
    assert stats.energy >= 0.9 > float(shares[stats.new_rank - 2])


@pytest.mark.parametrize(("rank", "energy"), [(None, None), (2, 0.9), (0, None), (None, 1.5), (None, 0.0)])
def test_rank_rule_is_validated(rank: int | None, energy: float | None) -> None:
    with pytest.raises(ValueError, match=r"rank|energy"):
        choose_rank(torch.ones(3), rank=rank, energy=energy)


def test_combine_is_the_weighted_sum_exactly() -> None:
    a = _module("lora_unet_conv", 12, 8, 5, 5.0, kernel=(3, 3), seed=4)
    b = _module("lora_unet_conv", 12, 8, 2, 0.5, kernel=(3, 3), seed=5)
    combined = combine_modules([(a, 0.7), (b, -1.3)], torch.float32)
    assert combined.rank == 7 and combined.alpha == 7.0
    assert combined.down.shape == (7, 8, 3, 3) and combined.up.shape == (12, 7, 1, 1)
    torch.testing.assert_close(_delta64(combined), 0.7 * _delta64(a) - 1.3 * _delta64(b), rtol=1e-5, atol=1e-5)


def test_combine_accepts_linear_and_1x1_layouts_but_not_other_shapes() -> None:
    linear = _module("lora_unet_proj_in", 12, 8, 3, 3.0, seed=6)
    conv = LoraModule("lora_unet_proj_in", linear.down[:, :, None, None] * 2, linear.up[:, :, None, None], 3.0)
    combined = combine_modules([(conv, 1.0), (linear, 1.0)], torch.float32)
    assert combined.down.dim() == 4  # the first module's layout
    torch.testing.assert_close(_delta64(combined), 3 * _delta64(linear), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="different shapes"):
        combine_modules([(linear, 1.0), (_module("lora_unet_proj_in", 12, 9, 3, 3.0), 1.0)], torch.float32)


def test_delta_from_a_known_low_rank_difference_is_recovered() -> None:
    known = _module("lora_unet_conv", 16, 6, 3, 3.0, kernel=(3, 3), seed=7)
    delta = known.delta()
    by_energy, stats = module_from_delta(known.name, delta, torch.float32, energy=0.999999)
    assert stats.new_rank == 3 and stats.old_rank == 16
    by_rank, _ = module_from_delta(known.name, delta, torch.float32, rank=3)
    for module in (by_energy, by_rank):
        assert module.down.shape == (3, 6, 3, 3) and module.up.shape == (16, 3, 1, 1)
        torch.testing.assert_close(module.delta(), delta, rtol=1e-4, atol=1e-5)


def test_broken_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="not a plain LoRA pair"):
        LoraModule("lora_unet_x", torch.zeros(4, 8), torch.zeros(8, 3), 4.0)
    with pytest.raises(ValueError, match="not a plain LoRA pair"):
        LoraModule("lora_unet_x", torch.zeros(4, 8, 3, 3), torch.zeros(8, 4, 3, 3), 4.0)
