"""Declarative search spaces (``search_spaces/*.yaml``): layer removal, recombination, channel
pruning, hybrid schedules. A space maps a dict of choices (Optuna's trial params) to a
:class:`~hybridsd_nas.arch.Candidate`; discrete ones enumerate every valid candidate."""

from .base import Categorical, Float, SearchSpace, SpacePoint
from .kinds import SPACE_KINDS
from .loader import list_spaces, load_space, space_from_dict, spaces_dir

__all__ = ["Categorical", "Float", "SPACE_KINDS", "SearchSpace", "SpacePoint", "list_spaces", "load_space", "space_from_dict", "spaces_dir"]
