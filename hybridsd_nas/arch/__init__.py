"""The U-Net architecture model: typed description (blocks, layers, units), candidates, plans.

Reads configs through :mod:`hybridsd_nas.sources`; building a module from a plan is
:mod:`hybridsd_nas.build`."""

from hybridsd_nas.arch.candidate import (
    CANDIDATE_PRESETS,
    IDENTITY,
    Candidate,
    candidate_preset,
    list_candidate_presets,
    recombine,
    resolve_candidate,
)
from hybridsd_nas.arch.model import BlockDesc, LayerDesc, UNetArch, UnitDesc, describe, describe_module, instantiate
from hybridsd_nas.arch.plan import BlockPlan, Plan, plan

__all__ = [
    "BlockDesc",
    "BlockPlan",
    "CANDIDATE_PRESETS",
    "Candidate",
    "IDENTITY",
    "LayerDesc",
    "Plan",
    "UNetArch",
    "UnitDesc",
    "candidate_preset",
    "describe",
    "describe_module",
    "instantiate",
    "list_candidate_presets",
    "plan",
    "recombine",
    "resolve_candidate",
]
