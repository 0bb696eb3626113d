"""headstart's Hydra plugins: the stacked launcher (hydra/launcher=stacked)."""
