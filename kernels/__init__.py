"""Triton kernels for hfcompress formats. Imports only torch and triton, lazily."""
