"""Prune a trained model: python prune.py model=RUN_DIR_OR_CKPT [pruning.ratio=0.5] [pruning.steps=8]"""
# The same main as the installed command headstart-prune (headstart.cli.prune): configs from conf/, outputs under the
# current folder.

from headstart.cli import prune

if __name__ == "__main__":
    prune()
