"""Grids, training, evaluation, metrics, scheduling, tracking and reports of fsbench."""
