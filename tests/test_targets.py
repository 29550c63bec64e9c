"""Target profiles: every shipped file loads, documents its keys, and bad files fail with one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgekd.device.errors import UsageError
from edgekd.device.paths import resource
from edgekd.device.targets import SHIPPED
from edgekd.export.profile import TargetProfile, load_target
from edgekd.export.steps import STEPS

CPU_TOML = resource("targets/cpu.toml").read_text()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_round_trips(name):
    profile = load_target(name)
    assert profile.name == name
    assert profile.execution_providers[-1] == "CPUExecutionProvider"
    assert profile.steps and all(s in STEPS for s in profile.steps)
    # validate reads the manifest's table; it must rebuild the same profile
    assert TargetProfile.from_mapping(profile.to_dict(), "round trip") == profile
    assert load_target(resource(f"targets/{name}.toml")) == profile


@pytest.mark.parametrize("name", SHIPPED)
def test_every_key_in_shipped_profiles_is_documented(name):
    lines = resource(f"targets/{name}.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+\s*=", line):
            commented = "#" in line or (i > 0 and lines[i - 1].lstrip().startswith("#"))
            assert commented, f"{name}.toml line {i + 1} has no comment: {line}"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_gates_are_set(name):
    gates = load_target(name).gates
    assert gates.min_top1_vs_reference is not None and gates.max_size_mb is not None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (("bits = 8 ", "bitz = 8 "), "unknown key 'matmul_nbits.bitz'"),
        (("opset = 17", "opset = \"17\""), "opset must be an integer"),
        (("block_size = 32       # power of two >= 16; 32", "block_size = 48       #"), "matmul_nbits.block_size = 48"),
        (("steps = [\"fuse_attention\", \"quantize_head_embedding\", \"matmul_nbits\", \"logits_to_keep\"]", "steps = [\"quantise\"]"), "unknown step 'quantise'"),
        (("min_top1_vs_reference = 0.90", "min_top1_vs_reference = 90"), "gates.min_top1_vs_reference = 90"),
        (("bits = 8 ", "bits = 3 "), "matmul_nbits.bits = 3"),
        (("head = \"int8\"", "head = \"int2\""), "head = 'int2' is not one of"),
        (("[gates]", "[gatez]"), "unknown key 'gatez'"),
        (("accuracy_level = 4    # the head as one node", "accuracy_level = 0    #"), "rescore_top_k recomputes a head computed at lower precision"),
    ],
)
def test_bad_profile_is_one_line_naming_key_and_file(tmp_path, edit, message):
    old, new = edit
    assert old in CPU_TOML
    path = write(tmp_path, CPU_TOML.replace(old, new, 1))
    with pytest.raises(UsageError) as e:
        load_target(path)
    text = str(e.value)
    assert message in text and "\n" not in text
    if "step" not in message and "= 48" not in message and "= 3" not in message and "= 97" not in message:
        assert str(path) in text


def test_a_node_pattern_in_both_activation_lists_is_refused(tmp_path):
    text = CPU_TOML.replace("fp32_activation_nodes = []", 'fp32_activation_nodes = ["down_proj"]', 1)
    path = write(tmp_path, text.replace("int8_activation_nodes = []", 'int8_activation_nodes = ["down_proj", "o_proj"]', 1))
    with pytest.raises(UsageError, match=r"\['down_proj'\] is in both fp32_activation_nodes and int8_activation_nodes"):
        load_target(path)


def test_missing_and_unknown_targets(tmp_path):
    with pytest.raises(UsageError, match="neither a shipped profile"):
        load_target("gpu")
    with pytest.raises(UsageError, match="neither a shipped profile"):
        load_target(tmp_path / "absent.toml")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_target(write(tmp_path, "steps = [\n"))


def test_profile_name_defaults_to_file_stem(tmp_path):
    assert load_target(write(tmp_path, 'steps = ["fp16"]\n')).name == "my"


def test_to_ort_must_be_last(tmp_path):
    with pytest.raises(UsageError, match="to_ort must be the last step"):
        load_target(write(tmp_path, 'steps = ["to_ort", "fp16"]\n'))
