"""The train stage: `train(cfg)` (recipe.py) and everything it runs: config validation, callbacks, fine-tuning
schedules, the lr finder, thresholds, DoF extraction, re-attach checks, cost and benefit reports, sweeps and
cross-validation summaries."""
