"""Rewrite rules the graph passes share as a library (simplify's rules; the passes in onnxopt.passes
assemble them).  A rule takes a node and a Context and returns a Match."""
