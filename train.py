"""Train a model: python train.py [experiment=NAME] [group=option ...] [key=value ...]"""
# The same main as the installed command headstart-train (headstart.cli.train): configs from conf/, outputs under the
# current folder.

from headstart.cli import train

if __name__ == "__main__":
    train()
