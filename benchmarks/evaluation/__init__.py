"""Evaluation of one model on fixed manifests: the planned feature cache (each distinct image
encoded once, within memory and disk budgets), the dispatch on what a method declares
(`methods/base.py`), and the public evaluator interface (`reset` / `process` / `result`) that
turns predictions into per-episode counts."""
