"""Declarative search spaces (``search_spaces/*.yaml``): layer removal, recombination, channel
pruning, hybrid schedules. A space maps a dict of choices (Optuna's trial params) to a
:class:`~hybridsd_nas.arch.Candidate`; discrete ones enumerate every valid candidate."""

from hybridsd_nas.spaces.base import Categorical, Float, SearchSpace, SpacePoint
from hybridsd_nas.spaces.kinds import SPACE_KINDS
from hybridsd_nas.spaces.loader import (
    SPACES,
    list_spaces,
    load_space,
    read_yaml,
    register_space,
    space_file,
    space_from_dict,
    spaces_dir,
)

__all__ = [
    "Categorical",
    "Float",
    "SPACES",
    "SPACE_KINDS",
    "SearchSpace",
    "SpacePoint",
    "list_spaces",
    "load_space",
    "read_yaml",
    "register_space",
    "space_file",
    "space_from_dict",
    "spaces_dir",
]
