"""Optuna samplers by name: the ``SAMPLERS`` registry.

A factory takes the :class:`~hybridsd_nas.study.StudyConfig` (its ``seed``, ``sampler_options`` and
constraints) and returns an Optuna sampler. Config validation and the CLI read the registry, so a
sampler registered by user code is accepted in a study's YAML at once::

    from hybridsd_nas.study import SAMPLERS

    @SAMPLERS.register("qmc", help="quasi-Monte Carlo")
    def qmc(cfg):
        return optuna.samplers.QMCSampler(seed=cfg.seed)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna

from hybridsd_nas.core.registry import Registry

from .metrics import METRICS

if TYPE_CHECKING:  # the config module validates sampler names against this registry
    from .config import StudyConfig

SamplerFactory = Callable[["StudyConfig"], optuna.samplers.BaseSampler]
SAMPLERS: Registry[SamplerFactory] = Registry("sampler")


def trial_constraints(t: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's constraints function: the violations the objective recorded (quality constraints)."""
    return list(t.user_attrs.get("constraint_violations", [0.0]))


def constraints_func(cfg: StudyConfig) -> Callable[[optuna.trial.FrozenTrial], list[float]] | None:
    """:func:`trial_constraints` when the study constrains a quality figure (cost constraints reject
    trials before they are scored), else None."""
    return trial_constraints if any(METRICS.get(c.metric).group == "quality" for c in cfg.constraints) else None


@SAMPLERS.register("nsga2", help="NSGA-II (options: population_size, default 16)")
def nsga2_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=cfg.sampler_options.get("population_size", 16),
                                         constraints_func=constraints_func(cfg))


@SAMPLERS.register("tpe", help="multivariate TPE (options: n_startup_trials, default 10)")
def tpe_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, constraints_func=constraints_func(cfg),
                                      n_startup_trials=cfg.sampler_options.get("n_startup_trials", 10))


@SAMPLERS.register("gp", help="Gaussian-process Bayesian optimisation (options: n_startup_trials, default 10)")
def gp_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=cfg.seed, constraints_func=constraints_func(cfg),
                                     n_startup_trials=cfg.sampler_options.get("n_startup_trials", 10))


@SAMPLERS.register("bruteforce", help="every point of a discrete space, in random order")
def bruteforce_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.BruteForceSampler(seed=cfg.seed)


@SAMPLERS.register("random", help="uniform random sampling")
def random_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """The sampler ``cfg.sampler`` names, made by its registered factory."""
    return SAMPLERS.get(cfg.sampler)(cfg)
