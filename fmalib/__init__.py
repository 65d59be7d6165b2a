"""fmalib: a reproducible study of Foundation Model Assisted Weakly Supervised Semantic Segmentation."""

__version__ = "0.1.0"
