"""From a plan to a module: a stock diffusers U-Net where a config expresses the candidate, else module
surgery on the base; weights inherited from the teacher (and a compressed Base for recombinations);
channel pruning through :mod:`hybridsd_nas.prune`; frozen parts."""

from hybridsd_nas.build.student import (
    Distillable,
    SkippedResnet,
    SkippedTransformer,
    apply_frozen,
    apply_surgery,
    build_student,
    load_base_blocks,
    student_of,
)

__all__ = ["Distillable", "SkippedResnet", "SkippedTransformer", "apply_frozen", "apply_surgery", "build_student", "load_base_blocks", "student_of"]
