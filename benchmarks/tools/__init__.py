"""Measurement scripts, apart from the engine (figures printed, never timed tests):
`python -m fsbench.benchmarks.tools.throughput`, `… .tools.measure_scheduling`,
`… .tools.protocol_episode`, `… .tools.ui_screenshot` (the MLflow UI's start time, memory
and the README's screenshots)."""
