"""fastvit: a drop-in, timm-compatible Vision Transformer whose hot paths are Triton kernels."""
