"""The samplers users know from A1111, built from a model's own scheduler config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from core.config.schema import Sampler


def make_sampler(name: Sampler, scheduler_config: dict[str, Any]) -> SchedulerMixin:
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(scheduler_config)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    return UniPCMultistepScheduler.from_config(scheduler_config)
