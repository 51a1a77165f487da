"""The linear algebra of LoRA tools: one module's update ΔW, and rebuilding it at another rank.

A LoRA module stores ΔW = (alpha / rank) · up @ down. Every tool here works on that product, never on
the factors alone: two factorisations of the same ΔW are the same LoRA, so resizing, combining and
extracting are all "find the best rank-r factors of this ΔW", which the truncated SVD answers exactly
(Eckart–Young): the Frobenius error² of a rank-r truncation is the sum of the discarded σ².

For a LoRA input ΔW is already low rank, so its SVD comes from QR of the two thin factors and an SVD
of a small r×r core (exact, O(n·r²)) instead of an SVD of the full out×in matrix. SVD math runs in
float64, so a lossless resize is lossless to the precision the file is stored in.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SVDFactors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (out, k), S (k,), Vh (k, in)


@dataclass
class LoraModule:
    """One LoRA module under its kohya name (`lora_unet_…` / `lora_te_…`), tensors as stored.

    Linear: down (r, in), up (out, r). Conv2d: down (r, in, kh, kw) carries the layer's kernel, up is
    (out, r, 1, 1); ΔW then reshapes to the layer's (out, in, kh, kw) weight.
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.shape[0] != self.up.shape[1] or any(size != 1 for size in self.up.shape[2:]):
            raise ValueError(
                f"LoRA module {self.name}: lora_down {tuple(self.down.shape)} and lora_up {tuple(self.up.shape)} "
                "are not a plain LoRA pair (ranks differ or up is not 1×1); the file is damaged or not a LoRA"
            )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def kernel(self) -> tuple[int, ...]:
        """The conv kernel (kh, kw) of down, () for a Linear module."""
        return tuple(self.down.shape[2:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the layer weight this module updates."""
        return (self.up.shape[0], *self.down.shape[1:])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (out, r), down (r, in·kh·kw)) in float64 with alpha / rank folded into down."""
        down = self.down.to(torch.float64).reshape(self.rank, -1) * (self.alpha / self.rank)
        return self.up.to(torch.float64).reshape(self.up.shape[0], self.rank), down

    def delta(self) -> torch.Tensor:
        """ΔW as the layer's weight shape, in float32 (the precision merges are done in)."""
        up, down = self.factors()
        return (up @ down).to(torch.float32).reshape(self.weight_shape)

    def to(self, dtype: torch.dtype) -> LoraModule:
        return LoraModule(self.name, self.down.to(dtype), self.up.to(dtype), self.alpha)

    def with_alpha(self, alpha: float) -> LoraModule:
        """The same ΔW stored under another alpha: each factor is scaled by √(old alpha / new alpha)."""
        if alpha == self.alpha:
            return self
        factor = math.sqrt(self.alpha / alpha)
        down = (self.down.to(torch.float64) * factor).to(self.down.dtype)
        up = (self.up.to(torch.float64) * factor).to(self.up.dtype)
        return LoraModule(self.name, down, up, float(alpha))


def uniform_alpha(modules: Sequence[LoraModule]) -> list[LoraModule]:
    """The modules under one alpha (the most common rank), ΔW unchanged.

    diffusers 0.42's kohya loader names per-module alphas wrongly for UNet attention and text-encoder
    modules, so a kohya file whose alphas differ loads mis-scaled there (A1111 and ComfyUI are fine).
    With one alpha per file it needs no per-module alpha at all, and every tool-made file loads right.
    """
    if not modules:
        return []
    alpha = float(collections.Counter(m.rank for m in modules).most_common(1)[0][0])
    return [module.with_alpha(alpha) for module in modules]


@dataclass(frozen=True)
class ModuleRank:
    """What a resize, compression or extraction did to one module: energy = Σσ² kept / Σσ²."""

    name: str
    old_rank: int
    new_rank: int
    energy: float


def module_from_factors(
    name: str, up: torch.Tensor, down: torch.Tensor, kernel: tuple[int, ...], dtype: torch.dtype
) -> LoraModule:
    """Build a module with alpha = rank (scale 1) from 2-D factors, restoring the conv layout."""
    rank = down.shape[0]
    down_t = down.reshape(rank, -1, *kernel) if kernel else down
    up_t = up.reshape(up.shape[0], rank, *(1 for _ in kernel))
    return LoraModule(name, down_t.to(dtype).contiguous(), up_t.to(dtype).contiguous(), float(rank))


def lowrank_svd(up: torch.Tensor, down: torch.Tensor) -> SVDFactors:
    """The exact thin SVD of up @ down (float64) through QR of each factor and an SVD of the small core."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def choose_rank(sigma: torch.Tensor, *, rank: int | None = None, energy: float | None = None) -> int:
    """The rank to keep: `rank` (capped at the available one), or the smallest r whose Σσ² share ≥ `energy`.

    A zero ΔW keeps rank 1 so the module (and the file's structure) survives with zero weights.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank (e.g. 8) or energy (e.g. 0.99)")
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        return max(1, min(rank, sigma.numel()))
    if energy is None or not 0 < energy <= 1:
        raise ValueError(f"energy must be a fraction in (0, 1], e.g. 0.99; got {energy}")
    squares = sigma.to(torch.float64) ** 2
    total = float(squares.sum())
    if total == 0:
        return 1
    shares = torch.cumsum(squares, 0) / total
    # a tiny allowance so energy=1.0 is reached despite the cumulative sum's rounding
    return min(int(torch.searchsorted(shares, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1, sigma.numel())


def energy_kept(sigma: torch.Tensor, rank: int) -> float:
    squares = sigma.to(torch.float64) ** 2
    total = float(squares.sum())
    return 1.0 if total == 0 else float(squares[:rank].sum()) / total


def truncate(
    name: str,
    svd: SVDFactors,
    kernel: tuple[int, ...],
    dtype: torch.dtype,
    *,
    old_rank: int,
    rank: int | None = None,
    energy: float | None = None,
) -> tuple[LoraModule, ModuleRank]:
    """Keep the top singular triplets; √σ goes to each factor so up and down have similar magnitudes,
    which keeps an fp16/bf16 file from losing the small factor to rounding."""
    u, s, vh = svd
    keep = choose_rank(s, rank=rank, energy=energy)
    root = s[:keep].sqrt()
    module = module_from_factors(name, u[:, :keep] * root, root[:, None] * vh[:keep], kernel, dtype)
    return module, ModuleRank(name, old_rank, keep, energy_kept(s, keep))


def resize_module(
    module: LoraModule, *, rank: int | None = None, energy: float | None = None
) -> tuple[LoraModule, ModuleRank]:
    """The best LoRA of at most `rank` (or reaching `energy`) for this module's ΔW, alpha = new rank."""
    svd = lowrank_svd(*module.factors())
    return truncate(module.name, svd, module.kernel, module.down.dtype, old_rank=module.rank, rank=rank, energy=energy)


def combine_modules(parts: Sequence[tuple[LoraModule, float]], dtype: torch.dtype) -> LoraModule:
    """One module with ΔW = Σ wᵢ·ΔWᵢ exactly: the scaled downs and the ups stacked, alpha = total rank.

    Modules of the same layer may come as Linear-shaped and 1×1-conv-shaped; the first one's layout wins.
    """
    first = parts[0][0]
    ups, downs = [], []
    for module, weight in parts:
        if math.prod(module.weight_shape) != math.prod(first.weight_shape) or module.up.shape[0] != first.up.shape[0]:
            raise ValueError(
                f"cannot combine {first.name}: the LoRAs update it with different shapes "
                f"({first.weight_shape} vs {module.weight_shape}); they were made for different models"
            )
        up, down = module.factors()
        ups.append(up)
        downs.append(down * weight)
    return module_from_factors(first.name, torch.cat(ups, 1), torch.cat(downs, 0), first.kernel, dtype)


def module_from_delta(
    name: str,
    delta: torch.Tensor,
    dtype: torch.dtype,
    *,
    rank: int | None = None,
    energy: float | None = None,
) -> tuple[LoraModule, ModuleRank]:
    """A LoRA approximating a full weight difference (extraction): thin SVD of ΔW as (out, in·kh·kw).

    Full-size matrices are decomposed in float32 (float64 would double the time of an SD 1.5 extract for
    no visible gain); `old_rank` in the report is the matrix's full rank bound min(out, in·kh·kw).
    """
    matrix = delta.to(torch.float32).reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return truncate(
        name, (u, s, vh), tuple(delta.shape[2:]), dtype, old_rank=min(matrix.shape), rank=rank, energy=energy
    )
