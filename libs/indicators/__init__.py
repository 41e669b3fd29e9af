"""Indicator kernels, their catalogue, named feature sets and the batch and streaming engines.

The one code path that training and serving share (invariant 1, train/serve parity):
the features service, the charts service, the trainer and inference all import it;
it imports nothing but numpy, numba and ``libs.common``.
"""
