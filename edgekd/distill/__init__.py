"""``edgekd distill``: knowledge distillation from a teacher LLM into a small student.

``trainer`` (``distill(cfg)``: the run, top to bottom), ``config`` (DistillConfig), ``students``
(where the student comes from; ``importance`` measures which layers matter), ``answers`` (the
records and the teacher's top-k), ``data`` (files, generation, batching), ``losses`` (divergences
and the chunked head loss), ``cache`` (the teacher top-k cache pass), ``checkpoint`` (atomic
checkpoints), ``loop`` (the loss module, evaluation, saving, logging).
"""

from edgekd.distill.config import DistillConfig

__all__ = ["DistillConfig", "distill"]


def distill(cfg: DistillConfig, **kw):
    from edgekd.distill.trainer import distill as _distill

    return _distill(cfg, **kw)
