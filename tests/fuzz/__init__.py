"""Differential fuzzing of onnxopt's lossless passes (issue "Never silently wrong").

strategies.py builds random valid ONNX graphs (one construction shared by hypothesis and the
soak runner), oracle.py runs original vs optimized on ONNX Runtime at several points,
soak.py is the long run, regressions.py holds minimal reproducers of every bug found.
"""
