"""The TOML → frozen dataclass loader: every input either loads or raises UsageError."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekd.device.config import from_mapping, read_toml, to_dict
from edgekd.device.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Inner:
    bits: int = 8
    symmetric: bool = True


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float = 0.5
    kind: Literal["a", "b"] = "a"
    layers: tuple[int, ...] = ()
    limit: Optional[float] = None
    path: Path = Path(".")
    inner: Inner = Inner()

    def __post_init__(self):
        if self.rate <= 0:
            raise UsageError(f"rate must be > 0, got {self.rate}")


def test_loads_nested_and_round_trips():
    cfg = from_mapping(Outer, {"name": "n", "rate": 2, "layers": [1, 2], "inner": {"bits": 4}, "path": "a/b"})
    assert cfg == Outer(name="n", rate=2.0, layers=(1, 2), inner=Inner(bits=4), path=Path("a/b"))
    assert from_mapping(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nmae": "x"}, "unknown key 'nmae'"),
        ({"inner": {"bitz": 4}}, "unknown key 'inner.bitz'"),
        ({"rate": "fast"}, "rate must be a number"),
        ({"inner": {"bits": 4.5}}, "inner.bits must be an integer"),
        ({"inner": {"symmetric": 1}}, "must be true or false"),
        ({"kind": "c"}, "is not one of"),
        ({"layers": 3}, "must be a list"),
        ({"rate": -1}, "rate must be > 0"),
    ],
)
def test_errors_name_the_key_and_file(data, message):
    with pytest.raises(UsageError, match=message) as e:
        from_mapping(Outer, data, where="my.toml")
    assert "my.toml" in str(e.value) or "rate must be" in message


def test_read_toml_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = = 1")
    with pytest.raises(UsageError, match="not valid TOML"):
        read_toml(bad)


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "rate", "kind", "layers", "limit", "path", "inner", "zz"]), toml_values, max_size=5))
def test_fuzz_loader_only_raises_usage_error(data):
    try:
        from_mapping(Outer, data, where="fuzz.toml")
    except UsageError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_read_toml(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "x.toml"
    path.write_bytes(blob)
    try:
        read_toml(path)
    except UsageError:
        pass
