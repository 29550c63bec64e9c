"""benchmarks/activation_tradeoff.py: its copies change only the layers named (never the head), and
its table reads each against the bundle's golden answers (the PyTorch model's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "activation_tradeoff.py"


def test_copies_with_int8_activations_and_the_table(tmp_path, tiny_teacher_dir, capsys):
    import onnx

    from edgekd.export import export_bundle

    spec = importlib.util.spec_from_file_location("activation_tradeoff", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bundle = tmp_path / "cpu"  # the layers at fp32 activations, as a GGUF teacher's grid weights are in the cpu profile
    export_bundle(str(tiny_teacher_dir), str(SCRIPT.parent / "profiles" / "cpu-layers-fp32-activations.toml"), bundle)
    changed = module.with_int8_activations(bundle, tmp_path / "copy", ["down_proj"])
    levels = {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level")
              for n in onnx.load(str(tmp_path / "copy" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"}
    assert changed == sum("down_proj" in name for name in levels) == 4  # one a layer
    assert all(level == 4 for name, level in levels.items() if "down_proj" in name)
    assert module.main([str(bundle), "--nodes", "down_proj", "--rounds", "1", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "int8 activations on" not in line]
    assert len(rows) == 2 and rows[1].split("|")[2].strip() == "4"
    # the bundle against PyTorch's golden answers: a random tiny model's near-ties flip, its top-1 holds
    assert float(rows[0].split("|")[5].split("/")[0]) >= 0.9
