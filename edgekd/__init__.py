"""edgekd: distill a small student from a teacher LLM, export it to ONNX for a device, validate it."""

from edgekd.device import __version__
from edgekd.device.errors import EdgekdError, UsageError

__all__ = ["EdgekdError", "UsageError", "__version__"]
