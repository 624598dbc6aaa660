"""The result store and its records: `results/<grid>/` is the source of truth. `records` is the
one writer, reader and check of a cell file (`CellConfig`, `CellRecord`, `SeedRecord`); `results`
owns the folder (cells, manifests, checkpoints, resume files, the grid lock, the environment
stamp). Imports neither torch nor ray."""
