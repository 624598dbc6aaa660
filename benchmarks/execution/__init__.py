"""Planning, execution and workers: `planning` turns a grid and the store into jobs (one per
model) with their manifests; `tasks` is what a worker runs (train, evaluate); `executors` run
jobs in-process or on Ray (the only importer of ray, with `watchdog`); `driver` turns task
outputs into cell records; `runner` ties them together."""
