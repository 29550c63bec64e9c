"""`edgekd export --search` on a tiny random Llama: candidates checked like the profile, a search
that keeps the smallest passing bundle (mixed precision included), and one where none passes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.device.bundle import read_manifest
from edgekd.device.bundle_report import BundleReport
from edgekd.device.errors import UsageError
from edgekd.device.targets import SHIPPED
from edgekd.export.profile import load_target
from edgekd.export.steps import STEPS
from edgekd.search import layer_prefixes, resolve_candidates, search_export, splice
from edgekd.validate import ValidateConfig

BASE = """
description = "test search"
steps = ["quantize_head_embedding", "matmul_nbits"]
[matmul_nbits]
bits = 4
algorithm = "rtn"
"""
# Small validation: 2 held-out prompts x 8 tokens, no speed process (the CLI test measures speed).
QUICK = ValidateConfig(num_prompts=2, answer_tokens=8, speed=False)


# Three candidates in order of preference: 4-bit RTN, measured mixed precision, 8-bit everywhere.
RTN4_AUTO_INT8 = """
[[candidates]]
name = "rtn4"
[[candidates]]
name = "auto"
mixed_precision = true
[[candidates]]
name = "int8"
[candidates.matmul_nbits]
bits = 8
"""

def profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "search.toml"
    path.write_text(BASE + text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_candidates_resolve_to_valid_profiles(name):
    prof = load_target(name)
    for c in resolve_candidates(prof):
        assert c.profile.gates == prof.gates and c.profile.execution_providers == prof.execution_providers
        assert c.profile.candidates == () and all(s in STEPS for s in c.profile.steps)
    if name == "mobile":
        by = {c.name: c for c in resolve_candidates(prof)}
        assert by["rtn4"].profile.settings["matmul_nbits"].algorithm == "rtn" and by["rtn4"].profile.settings["matmul_nbits"].bits == 4
        assert by["int8"].profile.settings["matmul_nbits"].bits == 8 and by["auto"].mixed_precision
        assert by["rtn4"].profile.settings["to_ort"] == prof.settings["to_ort"]  # not overridden: the profile's own
        assert by["hqq4"].profile.settings["matmul_nbits"].algorithm == "hqq" and by["int4-all"].profile.settings["matmul_nbits"].algorithm == "gptq"
        assert by["gptq4"].profile == dataclasses.replace(prof, candidates=())  # the profile's own recipe
        assert by["int8"].profile.settings["matmul_nbits"].algorithm == "rtn"  # 8 bits: round to nearest


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[candidates]]\nname = "a"\n[candidates.matmul_nbits]\nbitz = 4\n', "candidate 'a': unknown key 'matmul_nbits.bitz'"),
        ('[[candidates]]\nname = "a"\n[candidates.matmul_nbits]\nbits = "four"\n', "candidate 'a': matmul_nbits.bits must be an integer"),
        ('[[candidates]]\nname = "a"\n[candidates.matmul_nbits]\nbits = 5\n', "matmul_nbits.bits = 5: use 4 or 8"),
        ('[[candidates]]\nname = "a"\ncolour = "red"\n', "candidate 'a': unknown key 'colour'"),
        ('[[candidates]]\nname = "a"\n[candidates.gates]\nmax_size_mb = 1\n', "'gates' cannot be set per candidate"),
        ('[[candidates]]\ndescription = "no name"\n', "has no name"),
        ('[[candidates]]\nname = "a"\n[[candidates]]\nname = "a"\n', "two candidates are named 'a'"),
        ('[[candidates]]\nname = "a"\nmixed_precision = true\n[candidates.matmul_nbits]\nbits = 8\n', "mixed_precision needs"),
    ],
)
def test_bad_candidates_are_one_line_usage_errors(tmp_path, text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        load_target(profile(tmp_path, text))
    assert "\n" not in str(e.value)


def test_splice_takes_exactly_the_named_layers(tmp_path, tiny_teacher_dir):
    """A spliced graph has the donor's nodes for the named layer and the base's elsewhere."""
    import onnx

    from edgekd.export.onnx import export_onnx
    from edgekd.export.steps import load_onnx
    from edgekd.models import load_model

    model, _ = load_model(str(tiny_teacher_dir))
    fp32 = export_onnx(model, tmp_path / "fp32", 17)
    prof = load_target(profile(tmp_path, ""))
    STEPS["matmul_nbits"].fn(fp32, tmp_path / "q4" / "model.onnx", prof.settings["matmul_nbits"], prof)
    q4 = load_onnx(tmp_path / "q4" / "model.onnx")
    base = load_onnx(fp32)
    prefixes = layer_prefixes(q4)
    assert list(prefixes) == [0, 1, 2, 3] and prefixes[2] == "/model/layers.2/"
    mixed = splice(base, q4, [prefixes[2]])
    quantized = {n.name for n in mixed.graph.node if n.op_type == "MatMulNBits"}
    assert quantized and all("/layers.2/" in n for n in quantized)
    weights = {t.name for t in base.graph.initializer}
    linear = [n for n in base.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(quantized) == sum(1 for n in linear if "/layers.2/" in n.name) == 7  # q k v o gate up down
    assert sum(1 for n in mixed.graph.node if n.op_type == "MatMul" and n.input[1] in weights) == len(linear) - 7
    assert all(t.name.endswith("@donor") for t in mixed.graph.initializer if t.name not in weights)
    onnx.checker.check_model(mixed)

    # The export step keeps exactly the named layers at 8 bits (what the search's pick ships).
    settings = dataclasses.replace(prof.settings["matmul_nbits"], int8_nodes=(prefixes[2],))
    STEPS["matmul_nbits"].fn(fp32, tmp_path / "mixed" / "model.onnx", settings, prof)
    assert layer_bits(tmp_path / "mixed" / "model.onnx") == {0: {4}, 1: {4}, 2: {8}, 3: {4}}


def layer_bits(path: Path) -> dict[int, set[int]]:
    """Decoder layer -> the MatMulNBits bit widths its nodes use, read from the ONNX graph."""
    import onnx

    bits: dict[int, set[int]] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        m = re.search(r"/layers\.(\d+)/", n.name)
        if n.op_type == "MatMulNBits" and m:
            bits.setdefault(int(m.group(1)), set()).add(next(a.i for a in n.attribute if a.name == "bits"))
    return bits


def test_search_keeps_the_smallest_passing_candidate(tmp_path, tiny_teacher_dir):
    """rtn4 fails the KL gate; int8 passes; the mixed-precision candidate keeps the most sensitive
    layers at 8 bits. The search keeps the smallest that passes, with the search in its manifest."""
    path = profile(tmp_path, "[gates]\nmax_kl_vs_reference = 0.003\n" + RTN4_AUTO_INT8)
    out = tmp_path / "bundle"
    result = search_export(str(tiny_teacher_dir), path, out, validate_config=QUICK)
    by = {t.name: t for t in result.tried}
    assert set(by) == {"rtn4", "auto", "int8"}
    assert not by["rtn4"].passed and by["int8"].passed
    passing = [t for t in result.tried if t.passed]
    kept = result.tried[result.chosen_index]
    assert kept.passed and kept.metric("cost", "size_mb") == min(t.metric("cost", "size_mb") for t in passing)

    manifest = read_manifest(out, verify=True)  # moved whole: every hash still holds
    search = manifest["search"]
    assert search["chosen"] == kept.name and search["profile"]["name"] == "search"
    assert [c["name"] for c in search["candidates"]] == [t.name for t in result.tried]
    sens = search["sensitivity"]["auto"]
    assert sorted(r["layer"] for r in sens["layers"]) == [0, 1, 2, 3] and all(r["kl"] >= 0 for r in sens["layers"])
    auto = [c for c in search["candidates"] if c["name"] == "auto"]
    assert all(set(c["int8_layers"]) <= {0, 1, 2, 3} for c in auto)
    nbits = next(r for r in manifest["recipe"] if r["step"] == "matmul_nbits")
    assert nbits["int8_nodes"] == [f"/model/layers.{i}/" for i in (kept.int8_layers or [])]
    if kept.int8_layers is not None:  # the shipped graph has exactly those layers at 8 bits
        assert layer_bits(out / "model.onnx") == {i: {8 if i in kept.int8_layers else 4} for i in range(4)}
    assert manifest["target"]["candidates"] == []  # the kept recipe, resolved
    assert not list(tmp_path.glob(".bundle.*"))  # the work folder is gone


def test_cli_search_with_no_passing_candidate_exits_1_and_names_the_closest_gate(tmp_path, tiny_teacher_dir):
    """rtn4 (0.30 MB) is validated and misses an impossible KL gate by far; int8 (0.41 MB) is over
    the size budget, so it is not validated, and it is the closest to passing."""
    path = profile(tmp_path, """
[gates]
max_kl_vs_reference = 1e-7
max_size_mb = 0.36
[[candidates]]
name = "rtn4"
[[candidates]]
name = "int8"
[candidates.matmul_nbits]
bits = 8
""")
    out = tmp_path / "bundle"
    r = CliRunner().invoke(app, ["export", str(tiny_teacher_dir), "--target", str(path), "--out", str(out), "--search"])
    assert r.exit_code == 1, r.output
    text = " ".join(r.output.split())
    assert "no candidate of target 'search' passes its gates" in text
    assert "closest: 'int8', which fails max_size_mb" in text
    assert "(not validated)" in text and "max_kl_vs_reference" in text
    rtn4 = next(line for line in r.output.splitlines() if line.startswith("│ rtn4"))
    assert len([c for c in rtn4.split("│") if c.strip() and c.strip() != "–"]) >= 5  # size, tok/s, top-1, KL measured
    assert not out.exists() and not list(tmp_path.glob(".bundle.*"))


def test_mixed_precision_is_skipped_only_when_it_cannot_win(tmp_path):
    """Its smallest form is its 4-bit base: skipped when a passing bundle is no bigger than that."""
    from edgekd.search.results import Tried, _beaten

    prof = load_target(profile(tmp_path, RTN4_AUTO_INT8))
    cands = resolve_candidates(prof)
    auto = cands[1]

    def tried(size: float, passed: bool, name: str) -> Tried:
        return Tried(name, "", {}, tmp_path, report=BundleReport(passed=passed, cost={"size_mb": size}))

    assert _beaten(auto, cands, [tried(10, True, "rtn4"), tried(20, True, "int8")]).startswith("'rtn4' passes at 10.0 MB")
    assert _beaten(auto, cands, [tried(10, False, "rtn4"), tried(20, True, "int8")]) is None  # auto may land in between
    assert _beaten(auto, cands, [tried(10, False, "rtn4"), tried(9, True, "int8")]).startswith("'int8' passes at 9.0 MB")


def test_mixed_precision_is_skipped_when_its_base_is_over_the_size_budget(tmp_path):
    from edgekd.search.results import Tried, _beaten

    prof = load_target(profile(tmp_path, """
[gates]
max_size_mb = 5
[[candidates]]
name = "rtn4"
[[candidates]]
name = "auto"
mixed_precision = true
"""))
    cands = resolve_candidates(prof)
    over = Tried("rtn4", "", {}, tmp_path, report=BundleReport(passed=False, cost={"size_mb": 6.0}))
    assert "already over max_size_mb (6.0 MB > 5)" in _beaten(cands[1], cands, [over])


def test_a_candidate_that_exports_the_same_model_reuses_the_first_ones_validation(tmp_path, tiny_teacher_dir):
    """An override that changes nothing (as an int8-head setting on a student whose head export
    keeps on its int4 grid) gives the same model files: validated once, reported as the same."""
    from edgekd.search.run import table_rows

    path = profile(tmp_path, """
[[candidates]]
name = "rtn4"
[[candidates]]
name = "rtn4-again"
[candidates.matmul_nbits]
bits = 4
[[candidates]]
name = "int8"
[candidates.matmul_nbits]
bits = 8
""")
    seen: list[str] = []
    result = search_export(str(tiny_teacher_dir), path, tmp_path / "bundle", validate_config=QUICK, log=seen.append)
    by = {t.name: t for t in result.tried}
    assert by["rtn4-again"].same_as == "rtn4" and by["int8"].same_as is None and by["rtn4"].same_as is None
    assert by["rtn4-again"].report is by["rtn4"].report and by["rtn4"].report is not None
    assert [line for line in seen if line.startswith("validating")] == ["validating rtn4, int8 on the held-out set"]
    row = next(r for r in table_rows(result) if r[0] == "rtn4-again")
    assert row[-1].endswith("(the same model as rtn4)")
    record = next(c for c in read_manifest(tmp_path / "bundle")["search"]["candidates"] if c["name"] == "rtn4-again")
    assert record["same_as"] == "rtn4"
