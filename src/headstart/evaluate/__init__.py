"""The evaluate and predict stages: open any model (run, .ckpt, .onnx, bundle), measure it, predict, Grad-CAM."""
