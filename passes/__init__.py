"""onnxopt.passes: one optimization per module (see DESIGN "A pass"); looked up via onnxopt.registry."""
