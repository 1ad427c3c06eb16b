"""Studies: Optuna multi-objective search over a space, under cost budgets, on shared storage."""

from .config import METRICS, SAMPLERS, Constraint, Objective, StudyConfig, load_study_config, study_from_dict
from .results import feasible_trials, hypervolume, nondominated, normaliser, pareto_front, summarize
from .runner import Evaluator, TrialFailed, load_or_create_study, make_sampler, open_storage, run_study

__all__ = ["METRICS", "SAMPLERS", "Constraint", "Evaluator", "Objective", "StudyConfig", "TrialFailed", "feasible_trials",
           "hypervolume", "load_or_create_study", "load_study_config", "make_sampler", "nondominated", "normaliser",
           "open_storage", "pareto_front", "run_study", "study_from_dict", "summarize"]
