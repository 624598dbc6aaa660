"""Episodic training of one model from a recipe (`grid.recipes.TrainConfig`): the seeded step
plan, batches of episodes, optimizers and schedules, BatchNorm modes, resumable checkpoints,
validation on held-out training classes. Deterministic per seed whatever the worker count."""
