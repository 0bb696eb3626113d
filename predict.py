"""Predict on images: python predict.py model=BUNDLE|RUN_DIR|CKPT|ONNX inputs=FOLDER_OR_GLOB"""
# The same main as the installed command headstart-predict (headstart.cli.predict): configs from conf/, outputs under the
# current folder.

from headstart.cli import predict

if __name__ == "__main__":
    predict()
