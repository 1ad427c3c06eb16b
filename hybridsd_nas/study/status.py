"""What became of a trial, and why a worker stopped: the values stored in Optuna user attributes
(``status``) and written to JSON/CSV are these enums' string values."""

from __future__ import annotations

from enum import Enum

import optuna
from optuna.trial import TrialState


class _StrEnum(str, Enum):
    """A str-valued enum that prints, formats and serialises as its value (``enum.StrEnum`` is 3.11+)."""

    __str__ = str.__str__
    __format__ = str.__format__


class TrialStatus(_StrEnum):
    """The ``status`` user attribute of a trial."""

    OK = "ok"  # scored, within every constraint
    INFEASIBLE = "infeasible"  # scored, breaks a quality constraint
    REJECTED = "rejected"  # invalid candidate, over a cost budget, or stopped by a pre-filter (PRUNED)
    DUPLICATE = "duplicate"  # a candidate scored before: its figures reused
    FAILED = "failed"  # the proxy failed (NaN, out of memory, ...) (FAIL)
    INTERRUPTED = "interrupted"  # stopped by Ctrl-C; its choices queued again (FAIL)
    SURPLUS = "surplus"  # the budget was taken by other workers, or a concurrent twin runs the promotion; nothing run (FAIL)


SCORED = (TrialStatus.OK, TrialStatus.INFEASIBLE)  # trials whose figures a duplicate may reuse


class StopReason(_StrEnum):
    """Why :func:`~hybridsd_nas.study.run_study` returned (its ``stopped``)."""

    BUDGET = "budget"
    TRIALS = "trials"  # the study has its evaluated trials
    TIMEOUT = "timeout"
    FAILURES = "failures"  # max_failures trials failed in a row
    EXHAUSTED = "exhausted"  # only rejections and repeats for a long stretch
    INTERRUPTED = "interrupted"  # Ctrl-C


def evaluated(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that scored a new candidate: what the trial budget counts. Rejections (from the
    cost engine or a pre-filter) and repeats of a scored candidate are cheap and not counted; a
    multi-fidelity study's promotions (a candidate scored again at a higher rung) are not new."""
    return t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs and "promotion_of" not in t.user_attrs
