"""The export steps a profile names, in one registry. Each step is ``path in -> path out``.

A step lives in a module of this package, its settings beside its code:

    @dataclasses.dataclass(frozen=True)
    class Fp16(StepSettings):  # the profile's [fp16] table
        keep_io_types: bool = True

    @step("fp16", Fp16)
    def fp16(src: Path, dst: Path, settings: Fp16, profile) -> dict: ...

``fn(src, dst, settings, profile)`` reads the ONNX model at ``src``, writes its result at ``dst``
(``.onnx`` with external data beside it, or ``.ort`` for ``to_ort``), and returns facts worth
recording in the manifest's recipe. ``settings`` is the profile's table of the step's name, read into
the step's settings class: ``edgekd.export.profile`` asks this registry which tables a profile has.
What export asks of every step beyond running it (does it keep a quantization-aware student's grid,
does it change the PyTorch model before the trace) is a method of ``StepSettings`` the step's
settings override. Every module of this package is imported at the end of this file, so a new step
is one new module plus its profile lines; ``tests/test_export_steps.py`` checks every registered step
has a test.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekd.device.bundle import QatGrid
from edgekd.device.config import to_dict

StepFn = Callable[[Path, Path, Any, Any], dict]


class StepSettings:
    """The base of a step's settings (a frozen dataclass): what export asks of every step, with the
    answer of a step that does not care. A step overrides what concerns it."""

    def before_export(self, torch_model, tok, source, say: Callable[[str], None]) -> tuple[Any, dict | None]:
        """The PyTorch model the exporter traces, changed for this step (GPTQ rounds its weights),
        and what was done, recorded in the step's recipe entry; ``(torch_model, None)``: unchanged."""
        return torch_model, None

    def reproduces_qat_grid(self, qat: QatGrid, report: dict[str, Any] | None = None) -> bool:
        """Whether the step keeps a ``--qat-bits`` student's weights on the grid it was trained on
        (``qat``: the grid distill.json records; ``report``: the step's recipe entry once it
        ran, None before). A step that leaves weights alone, or rounds all alike (fp16), keeps it."""
        return True


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    fn: StepFn
    settings: type[StepSettings] | None = None  # the profile table's class; None: the step has no table
    suffix: str = ".onnx"  # the file the step writes


STEPS: dict[str, Step] = {}


def step(name: str, settings: type[StepSettings] | None = None, suffix: str = ".onnx") -> Callable[[StepFn], StepFn]:
    """Register ``fn`` as the export step ``name``, its profile table read into ``settings``."""
    def deco(fn: StepFn) -> StepFn:
        if name in STEPS:
            raise RuntimeError(f"step {name!r} registered twice")
        STEPS[name] = Step(name, fn, settings, suffix)
        return fn

    return deco


def run_step(name: str, src: Path, work: Path, settings: Any, profile: Any) -> tuple[Path, dict[str, Any]]:
    """Run the step ``name`` on the model at ``src``, writing into the folder ``work``. Returns the
    model it wrote and its recipe entry (its settings and what it reported). Export and the search
    both run steps through here."""
    st = STEPS[name]
    dst = Path(work) / f"model{st.suffix}"
    info = st.fn(Path(src), dst, settings, profile)
    return dst, {"step": name, **(to_dict(settings) if settings is not None else {}), **info}


# ---------------------------------------------------------------------------------------------
# Saving: every intermediate and final .onnx keeps its weights in one external file beside it when
# asked or when the protobuf limit (2 GB) forces it.
PROTOBUF_LIMIT = 2_000_000_000


def save_onnx(model, path: Path, external: bool | None = None) -> None:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = model.ByteSize() > PROTOBUF_LIMIT
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def load_onnx(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def ensure_ms_domain(model) -> None:
    import onnx

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


# Every module of this package holds steps: importing it registers them.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
