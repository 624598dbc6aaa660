"""MLflow tracking, on the driver only: `tracker` talks to MLflow (its only importer): grid,
invocation, training and cell runs, the background logging thread, `sync`; `cell_run` composes
what a cell's run holds as plain values; `panels` draws the qualitative panels (numpy) that a
run carries and the report's figure reuses."""
