"""Exact (fixed-point) numerics: not available yet in this build."""
raise NotImplementedError(
    "MEFTConfig(numerics='exact') is not implemented yet; use numerics='float' (the paper's arithmetic)")
