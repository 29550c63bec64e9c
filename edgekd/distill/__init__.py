"""``edgekd distill``: knowledge distillation from a teacher LLM into a small student.

``config`` (DistillConfig), ``students`` (where the student comes from), ``data`` (files, teacher
answers, batching), ``losses`` (divergences and the chunked head loss), ``cache`` (teacher top-k
cache), ``checkpoint`` (atomic checkpoints), ``loop`` (``distill(cfg)``: the loop).
"""

from edgekd.distill.config import DistillConfig

__all__ = ["DistillConfig", "distill"]


def distill(cfg: DistillConfig, **kw):
    from edgekd.distill.loop import distill as _distill

    return _distill(cfg, **kw)
