"""Worker side of pscluster: the worker daemon, the parameter client, the
numpy/cupy backprop library, data loading and device choice.

Imports `protocol` only; never `ps`.
"""
