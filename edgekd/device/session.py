"""How edgekd opens an onnxruntime session: the options, the execution providers this build has,
the session settings a user may add (``--session-config``), and a one-line error for an operator
this onnxruntime lacks. The runtime, export's checks and its steps all open sessions through here."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from edgekd.device.errors import UsageError

# SessionOptions switches ``session_config`` may set besides config entries (KEY=0|1): the memory levers
SESSION_OPTIONS = ("enable_cpu_mem_arena", "enable_mem_pattern", "enable_mem_reuse")
LOGITS_TO_KEEP = "logits_to_keep"  # export's input of that name: how many last positions the head computes


def session_options(threads: int | None, config: dict[str, str]):
    """The SessionOptions the runtime opens a bundle with: every graph optimization, ``threads``
    intra-op threads (None: one per physical core), sequential, quiet, and ``config`` applied."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    for key, value in config.items():  # e.g. mlas.disable_kleidiai = 1 (docs/devices.md)
        if key in SESSION_OPTIONS:  # a SessionOptions switch rather than a config entry
            setattr(opts, key, value.lower() not in ("0", "false", "off"))
        else:
            opts.add_session_config_entry(key, value)
    return opts


def keeps_logits(sess) -> bool:
    """Whether a session's graph has export's ``logits_to_keep`` input (an input with a default, which
    onnxruntime lists among the overridable initializers, not the inputs)."""
    return any(i.name == LOGITS_TO_KEEP for i in sess.get_overridable_initializers())


def parse_session_config(items: Sequence[str]) -> dict[str, str]:
    """``["mlas.disable_kleidiai=1"]`` -> ``{"mlas.disable_kleidiai": "1"}``: onnxruntime session
    config entries (``SessionOptions.add_session_config_entry``), or one of the ``SESSION_OPTIONS``
    switches (``enable_cpu_mem_arena=0``), as ``--session-config`` gives them."""
    entries = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--session-config {item!r}: give KEY=VALUE, e.g. mlas.disable_kleidiai=1")
        entries[key.strip()] = value.strip()
    return entries


def choose_providers(wanted: Sequence[str], warn: bool = True) -> tuple[list[str], list[str]]:
    """Keep the providers this onnxruntime build has, CPU last; warn (unless not ``warn``) for each
    one it lacks. Every session edgekd opens, at export and at run time, chooses through this."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen, notes = [], []
    for p in wanted:
        if p in available:
            if p not in chosen and p != "CPUExecutionProvider":
                chosen.append(p)
        else:
            notes.append(
                f"execution provider {p} is not in this onnxruntime build ({ort.__version__}, has "
                f"{', '.join(sorted(available))}): falling back to CPUExecutionProvider"
            )
    for note in notes if warn else ():
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    return chosen + ["CPUExecutionProvider"], notes


_MISSING_OP = re.compile(r"(?:([\w.]+):)?(\w+)\((-?\d+)\) is not a registered function/op|"
                         r"Could not find an implementation for (\w+)\((\d+)\)")


def missing_operator(message: str, exported_with: str | None = None) -> str | None:
    """One line naming the operator an onnxruntime error says it lacks, and the release to install:
    the one the bundle was exported and checked with (``exported_with``, from its manifest)."""
    import onnxruntime as ort

    m = _MISSING_OP.search(message)
    if not m:
        return None
    domain, op = (m.group(1) or "ai.onnx", m.group(2)) if m.group(2) else ("ai.onnx", m.group(4))
    need = (f"install onnxruntime >= {exported_with} (the release the bundle was exported and checked with)" if exported_with
            else "install a newer onnxruntime, or re-export the bundle with this one")
    return f"this onnxruntime ({ort.__version__}) has no operator {domain}:{op}, which the bundle uses: {need}"
