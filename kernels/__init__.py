"""Fused ops, one file each: Triton forward and backward kernels, their launcher, and the torch reference.

Installed as ``fastvit.kernels`` (never as a top-level ``kernels`` module).
"""
