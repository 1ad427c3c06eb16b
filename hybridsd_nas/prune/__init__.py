"""Channel pruning of Stable Diffusion U-Nets through torch-pruning (Hybrid SD's structural pruning).

``prune_student(model, plan, ...)`` cuts the inner widths a candidate's ``prune`` asks for, per
stage: ResNet inner channels (whole GroupNorm groups), attention heads (whole heads) and
feed-forward width (channels). Block in/out channels and skip connections never change, so the
pruned U-Net is a drop-in replacement. The units kept are chosen by an importance criterion
(:data:`IMPORTANCE`: ``magnitude``, ``taylor``, ``latent-stats``); the cut itself is torch-pruning's
``prune_*_channels``, after which diffusers' bookkeeping (``Attention.heads``/``inner_dim``,
GroupNorm ``num_groups``, Down/Upsample2D ``channels``) is repaired and checked.

On the meta device only shapes are cut (the first units are kept), which is how the cost engine
predicts the params and MACs of the really pruned model without weights or data. The returned
:class:`PruneRecord` (JSON) lists every cut and replays it on a fresh student (:func:`replay`).
"""

from hybridsd_nas.prune._engine import (
    Group,
    collect_groups,
    fix_and_check,
    keep_count,
    masking,
    prune_student,
    replay,
    stage_of,
)
from hybridsd_nas.prune._importance import IMPORTANCE, Context, get_importance, register_importance
from hybridsd_nas.prune._record import ROUNDING, GroupRecord, PruneRecord
from hybridsd_nas.prune._targets import TARGETS, Target, UnsupportedModuleError

__all__ = [
    "IMPORTANCE",
    "ROUNDING",
    "TARGETS",
    "Context",
    "Group",
    "GroupRecord",
    "PruneRecord",
    "Target",
    "UnsupportedModuleError",
    "collect_groups",
    "fix_and_check",
    "get_importance",
    "keep_count",
    "masking",
    "prune_student",
    "register_importance",
    "replay",
    "stage_of",
]
