"""``edgekd export --search``: the smallest bundle that still passes the target's gates.

A profile lists candidate recipes in order of preference, each a ``[[candidates]]`` table with a
``name`` and the tables it overrides::

    [[candidates]]
    name = "rtn4"                        # required, unique
    description = "4-bit RTN, int8 head"  # optional
    [candidates.matmul_nbits]
    algorithm = "rtn"                    # only the keys given change; the rest is the profile's

A candidate may override any key of the profile except ``name``, ``description``, ``gates``,
``execution_providers`` and ``candidates``: every candidate is held to the same gates on the same
device. ``mixed_precision = true`` marks the candidate the search fills in itself: its own recipe
(which must run ``matmul_nbits`` at 4 bits) with the decoder layers that measure most sensitive
kept at 8 bits (``matmul_nbits.int8_nodes``), as few as the gates allow.

The search, top to bottom (``search_export``): export the fp32 ONNX once; export every fixed
candidate from it (``export_bundle``) into a work folder beside ``out``; validate them together
(``edgekd.validate``) on the held-out set; for a mixed-precision candidate, measure each layer's
sensitivity, pick the int8 layers, export and validate it (bisecting their number); keep
the smallest passing bundle (the fastest among those within ``SIZE_TIE`` of it) as ``out``,
atomically, with the search recorded under ``manifest["search"]``. When none passes:
``NoCandidatePasses`` (exit 1) naming the candidate and the gate that came closest.

Mixed precision by measured sensitivity (in the spirit of HAWQ, Dong et al. 2019, and of the
per-layer sensitivity scans in llama.cpp's and AutoRound's mixed recipes, with KL on calibration
text as the measure): each decoder layer alone is quantized to 4 bits, the rest at 8 bits, and
the KL(fp32 || that model) on calibration text is the layer's
sensitivity. The mixed models are spliced from the real 4-bit and 8-bit outputs of the
``matmul_nbits`` step (same kernels as the shipped bundle), and a proxy (KL and top-1 on the
calibration text, with a safety margin against the gates) picks how many layers go to 8 bits. The scan keeps
the other layers at 8 bits rather than fp32 (8-bit costs KL 0.005 on SmolLM2, benchmarks/RESULTS-export.md): the same
ranking from graphs a third of the size, which load and run faster.
"""

from edgekd.export.profile import Candidate, resolve_candidates
from edgekd.search.results import NoCandidatePasses, SearchResult, Tried
from edgekd.search.run import search_export, table_rows
from edgekd.search.sensitivity import layer_prefixes, splice

__all__ = ["Candidate", "resolve_candidates", "search_export", "SearchResult", "NoCandidatePasses", "table_rows",
           "Tried", "layer_prefixes", "splice"]
