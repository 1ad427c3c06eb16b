"""Research scripts, one package per question; run from the repository root as ``python -m experiments.research.<topic>.<script>``."""
