"""Tools over finished runs: the model zoo, comparing runs' curves, re-measuring a run, notebook helpers."""
