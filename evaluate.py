"""Evaluate a model: python evaluate.py model=RUN_DIR|CKPT|ONNX|BUNDLE [data=...] [split=test]"""
# The same main as the installed command headstart-evaluate (headstart.cli.evaluate): configs from conf/, outputs under the
# current folder.

from headstart.cli import evaluate

if __name__ == "__main__":
    evaluate()
