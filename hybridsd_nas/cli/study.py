"""``search``, ``pareto``, ``export`` and ``report``: Optuna studies and what they leave behind."""

from hybridsd_nas.study.cli import register  # noqa: F401  (moved here once study/ is split)
