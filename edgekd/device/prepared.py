"""A bundle's model prepared for this machine, so that the next load maps its weights from disk.

When onnxruntime opens a model it optimizes the graph and *prepacks* each 4-bit MatMulNBits weight
into the layout of this CPU's kernels: a second copy of most of the model, on the heap, for as long as
the session lives (and the weights it packed from stay resident too where they were mapped). Saved
once with ``session.save_external_prepacked_constant_initializers``, the optimized graph keeps its
packed weights in its external data file, and the next session maps them from there, as llama.cpp
maps a GGUF: resident only as they are read, pages the system can drop and read again, and the
originals they were packed from never read at all.

The packed layout belongs to this CPU and this onnxruntime, so the prepared model is kept under a
cache folder, in a subfolder named by the model file's SHA-256, onnxruntime's version, the machine
and its CPU's instruction-set flags: another machine, or another release, prepares its own. It is
written to a temporary folder and renamed into place when complete, so a killed preparation leaves
nothing that a later load would take. Only ``.onnx`` bundles are prepared: an ``.ort`` file has no
external data to map.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from edgekd.device.errors import UsageError, first_line
from edgekd.device.io import cpuinfo_field

MODEL = "model.onnx"
DONE = "prepared.json"


def prepared_key(model_sha256: str, providers: Sequence[str]) -> str:
    """The cache subfolder's name: what the packed layout depends on."""
    import onnxruntime as ort

    parts = [model_sha256, ort.__version__, platform.machine(),
             cpuinfo_field("flags", "features") or platform.processor(), ",".join(providers)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def prepared_model(model_path: Path, model_sha256: str, cache: Path, options: Callable[[], object],
                   providers: Sequence[str]) -> Path:
    """The prepared copy of ``model_path`` under ``cache`` (made now when there is none); ``options``
    makes the SessionOptions the runtime opens the model with."""
    import onnxruntime as ort

    cache = Path(cache)
    folder = cache / prepared_key(model_sha256, providers)
    if (folder / DONE).is_file():
        return folder / MODEL
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".preparing-", dir=cache))
    except OSError as e:
        raise UsageError(f"cannot write the prepared model under {cache}: {e.strerror or e}: give a writable folder") from None
    try:
        opts = options()
        opts.optimized_model_filepath = str(tmp / MODEL)  # type: ignore[attr-defined]
        for key, value in (("session.optimized_model_external_initializers_file_name", MODEL + ".data"),
                           ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
                           ("session.save_external_prepacked_constant_initializers", "1")):
            opts.add_session_config_entry(key, value)  # type: ignore[attr-defined]
        ort.InferenceSession(str(model_path), sess_options=opts, providers=list(providers))
        (tmp / DONE).write_text(json.dumps({"model_sha256": model_sha256, "onnxruntime": ort.__version__,
                                            "machine": platform.machine()}), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process prepared it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"onnxruntime could not prepare {model_path} for this machine: {first_line(e)}") from None
    return folder / MODEL
