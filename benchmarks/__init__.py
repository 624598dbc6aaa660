"""The engine of fsbench, one subpackage per concern, in layer order (imports go downward):

- `metrics`      per-episode counts, the metric registry, bootstrap intervals
- `grid/`        grid files, method entries, training recipes, cells and their ids
- `store/`       cell records and the results folder (the source of truth)
- `training/`    episodic training of one model
- `evaluation/`  the feature cache, the evaluation dispatch and the evaluator
- `execution/`   planning, worker tasks, serial and Ray executors, the driver
- `tracking/`    MLflow runs (driver only) and the qualitative panels they carry
- `report/`      tables, statistics and figures from the store (no torch, no ray)
- `cli/`         the command line and the Python API
- `tools/`       measurement scripts
"""
