"""edgekd: distill a small student from a teacher LLM, export it to ONNX for a device, validate it."""

__version__ = "0.1.0"

from edgekd.errors import EdgekdError, UsageError

__all__ = ["EdgekdError", "UsageError", "__version__"]
