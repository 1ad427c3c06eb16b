"""Studies: Optuna multi-objective search over a space, under cost budgets, on shared storage.

Modules by job: ``config`` (the YAML, validated), ``metrics`` (the METRICS registry), ``samplers``
(the SAMPLERS registry), ``storage`` (where a study lives), ``evaluator`` (cost and proxy of a
point), ``objective`` (one trial), ``status`` (what became of a trial), ``worker`` (run_study),
``results`` (rows, the front, hypervolume), ``outputs`` (the files a study leaves), ``report``
(the HTML page), ``hybrid`` (hybrid-schedule points), ``pick`` (one model for a device budget). The commands are :mod:`hybridsd_nas.cli.study`.
"""

from .config import (
    WANDB_MODES,
    Constraint,
    Objective,
    PipelineSpec,
    StudyConfig,
    artifacts_dir_of,
    load_study_config,
    results_dir_of,
    study_from_dict,
)
from .evaluator import Evaluator, check_constraints, cost_figures
from .fidelity import Fidelity, audit, promotion_candidates
from .metrics import METRIC_GROUPS, METRICS, Metric, register_metric
from .objective import Surplus, TrialFailed, TrialObjective, save_grid
from .outputs import (
    claim_results_dir,
    export_extra,
    export_row,
    export_trial,
    format_table,
    front_columns,
    front_json,
    metric_columns,
    model_card,
    pick_best,
    write_front_csv,
    write_outputs,
)
from .pick import BUDGET_FORMS, Budget, Pick, export_pick, parse_budget, pick, quality_objective
from .report import build_report
from .results import (
    HV_NOTE,
    feasible_trials,
    format_value,
    hypervolume,
    nondominated,
    normaliser,
    pareto_front,
    summarize,
    trial_row,
)
from .rungs import checkpoint_dir, describe_audit, enqueue_promotions, highest_rung_trials, study_audit
from .samplers import SAMPLERS, make_sampler
from .status import StopReason, TrialStatus, evaluated
from .storage import default_storage_url, load_or_create_study, load_study, open_storage, redact_url
from .worker import enqueue_known, requeue, run_study

__all__ = [
    "BUDGET_FORMS",
    "HV_NOTE",
    "METRICS",
    "METRIC_GROUPS",
    "SAMPLERS",
    "WANDB_MODES",
    "Budget",
    "Constraint",
    "Evaluator",
    "Fidelity",
    "Metric",
    "Objective",
    "Pick",
    "PipelineSpec",
    "StopReason",
    "StudyConfig",
    "Surplus",
    "TrialFailed",
    "TrialObjective",
    "TrialStatus",
    "artifacts_dir_of",
    "audit",
    "build_report",
    "check_constraints",
    "checkpoint_dir",
    "claim_results_dir",
    "cost_figures",
    "default_storage_url",
    "describe_audit",
    "enqueue_known",
    "enqueue_promotions",
    "evaluated",
    "export_extra",
    "export_pick",
    "export_row",
    "export_trial",
    "feasible_trials",
    "format_table",
    "format_value",
    "front_columns",
    "front_json",
    "highest_rung_trials",
    "hypervolume",
    "load_or_create_study",
    "load_study",
    "load_study_config",
    "make_sampler",
    "metric_columns",
    "model_card",
    "nondominated",
    "normaliser",
    "open_storage",
    "pareto_front",
    "parse_budget",
    "pick",
    "pick_best",
    "promotion_candidates",
    "quality_objective",
    "redact_url",
    "register_metric",
    "requeue",
    "results_dir_of",
    "run_study",
    "save_grid",
    "study_audit",
    "study_from_dict",
    "summarize",
    "trial_row",
    "write_front_csv",
    "write_outputs",
]
