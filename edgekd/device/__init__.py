"""What runs on the device: the bundle's format, the onnxruntime session and generation loop, the
golden check, the gates and the report type, and the numpy halves of fidelity and speed.

This folder is what ``pip install edgekd`` (no ``[toolchain]``) must run: it imports no toolchain
library at module level and nothing of edgekd outside it (tests/test_architecture.py checks both).
The road above it reads bottom to top: device, distill, export, validate, search, pipeline.
"""

__version__ = "0.1.0"  # the package's version (pyproject.toml says the same): bundles and reports carry it
