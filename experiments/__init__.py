"""Studies to run (the YAML files here) and, under ``research/``, the research scripts behind the results."""
