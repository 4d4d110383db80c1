"""onnxopt: post-export optimizer for ONNX models, validated on ONNX Runtime."""

__version__ = "0.1.0"
