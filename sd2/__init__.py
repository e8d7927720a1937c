"""sd2: Self-Distilled Sparse Drafters for speculative decoding."""

__version__ = "0.1.0"
