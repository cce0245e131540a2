"""Property-based fuzzing of configuration (hypothesis): random values, valid and invalid (NaN, inf, negatives,
huge integers, booleans, fractions, strings with control characters, lists and mappings), for random fields, by
every route a value arrives (keyword arguments, a YAML file, a CLI override), and random bytes as a whole YAML file.

The property: `load_config` returns a Config whose every value lies in the domain its field's doc line states,
or raises exactly one ConfigError whose message is one bounded line naming a fuzzed field — never any other
exception. The oracle reads the domains from the doc lines (`field_docs`), not from the checker's table.
"""

from __future__ import annotations

import math
import re
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlxtune.config import Config, all_keys, field_docs, load_config, read_yaml_config
from mlxtune.errors import ConfigError

DOCS = field_docs()
SECTIONS = ("model", "model.quantize", "lora", "data", "train")
LEAVES = [k for k in all_keys() if k not in SECTIONS]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------------------
# The oracle: a field's domain as its doc line states it


def _section_class(key: str):
    cls = Config
    for part in key.split(".")[:-1]:
        tp = typing.get_type_hints(cls)[part]
        cls = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    return cls


def _optional(key: str) -> bool:
    tp = typing.get_type_hints(_section_class(key))[key.rsplit(".", 1)[-1]]
    return type(None) in typing.get_args(tp)


def _bool_field(key: str) -> bool:
    return typing.get_type_hints(_section_class(key))[key.rsplit(".", 1)[-1]] is bool


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_interval(v, lo: str, hi: str, lo_b: str, hi_b: str) -> bool:
    lo_v, hi_v = float(lo), float(hi)
    return (v > lo_v if lo_b == "(" else v >= lo_v) and (v < hi_v if hi_b == ")" else v <= hi_v)


def in_documented_domain(key: str, v) -> bool:
    """Whether `v` lies in the domain the doc line of `key` states (None where the field is Optional)."""
    doc = DOCS[key]
    if v is None:
        return _optional(key)
    if _bool_field(key):
        return isinstance(v, bool)
    if m := re.search(r"a count in \[1, (\d+)\] or a non-empty list of distinct layer indices in \[0, (\d+)\]", doc):
        if _is_int(v):
            return 1 <= v <= int(m.group(1))
        return (isinstance(v, list) and bool(v) and len(set(v)) == len(v)
                and all(_is_int(i) and 0 <= i <= int(m.group(2)) for i in v))
    if m := re.search(r"an integer in \[(-?\d+), (\d+)\]", doc):
        return _is_int(v) and int(m.group(1)) <= v <= int(m.group(2))
    if m := re.search(r"a finite number in ([\[(])([-\d.e]+), ([\d.e]+)([\])])", doc):
        return isinstance(v, float) and math.isfinite(v) and _in_interval(v, m.group(2), m.group(3), m.group(1), m.group(4))
    if m := re.search(r"a positive number of GB \(finite, at most (\d+)\)", doc):
        return isinstance(v, float) and math.isfinite(v) and 0 < v <= float(m.group(1))
    if m := re.search(r"(a non-empty |a )(path without control characters|list of distinct names)|text, at most", doc):
        return _text_ok(doc, v)
    if m := re.search(r"one of (.*?)(, or a \.jinja file)?\.$", doc):
        choices = m.group(1).split(", ")
        shown = {True: "true", False: "false"}.get(v, str(v)) if not isinstance(v, (list, dict)) else None
        return shown in choices or (bool(m.group(2)) and isinstance(v, str) and v.endswith((".jinja", ".j2")))
    raise AssertionError(f"{key}: no domain found in its doc line {doc!r}")


def _text_ok(doc: str, v) -> bool:
    if "list of distinct names" in doc:
        return isinstance(v, list) and ("non-empty" not in doc or bool(v)) and len(set(v)) == len(v) and \
            all(isinstance(n, str) for n in v)
    limit = int(re.search(r"at most (\d+) characters", doc).group(1))
    ok = isinstance(v, str) and len(v) <= limit
    if "non-empty path" in doc:
        ok = ok and bool(v.strip())
    if "without control characters" in doc:
        ok = ok and not any(ord(c) < 32 or ord(c) == 127 for c in v)
    return ok


_ABSENT = object()


def _get(cfg: Config, key: str):
    """The value of a dotted key, or _ABSENT under a section that is null (model.quantize)."""
    node = cfg
    for part in key.split("."):
        if node is None:
            return _ABSENT
        node = getattr(node, part)
    return node


def test_the_oracle_finds_a_domain_in_every_doc_line():
    from mlxtune.config import QuantizeConfig

    defaults = Config()
    defaults.model.quantize = QuantizeConfig()
    for key in LEAVES:
        if key != "model.quantize":
            assert in_documented_domain(key, _get(defaults, key)), key


# --------------------------------------------------------------------------------------------------------------
# Values, keys and routes


_CHARS = st.characters(blacklist_categories=("Cs",))  # any code point a UTF-8 file can hold, control ones included
_WORDS = st.sampled_from(["nan", "inf", "-inf", ".nan", "1e-4", "1e999", "8", "8.5", "-3", "0", "true", "no", "null",
                          "auto", "q", "q_proj", "v_proj", "tensorboard", "wandb", "val_loss", "rougeL", "cosine",
                          "float16", "messages", "x.jinja", "", " ", "a\x00b", "run\n", "9" * 30, "[0, 1]", "[q, v]"])
_EDGES = st.sampled_from([0, 1, -1, 2, 4, 8, 32, 48, 64, 0.0, 0.5, 0.999, 1.0, 1.5, -0.5, 1e-8, 4096, 4097, 65536, 65537,
                          1_048_576, 10_000, 2**63 - 1, 2**63, 10**40, -(10**40), 1e9, 1e308])
_SCALARS = st.one_of(
    st.none(), st.booleans(), _EDGES, _WORDS,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(_CHARS, max_size=12),
)
VALUES = st.one_of(
    _SCALARS,
    st.lists(st.one_of(_EDGES, _WORDS, st.booleans()), max_size=4),
    st.dictionaries(st.sampled_from(["bits", "group_size", "rank", "x"]), _SCALARS, max_size=2),
)
KEYS = st.sampled_from(LEAVES + ["model.quantize", "lora", "train"])


def _plausible(key: str):
    """Values near the field's default (mostly in its domain), so that valid configs come up often too."""
    from mlxtune.config import QuantizeConfig

    defaults = Config(model=Config().model.__class__(quantize=QuantizeConfig()))
    value = _get(defaults, key) if key not in SECTIONS or key == "model.quantize" else {}
    if key == "model.quantize":
        value = {"bits": 8, "group_size": 32}
    options = [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        options += [type(value)(value * 2), type(value)(value / 2), value + 1, type(value)(0)]
    return st.sampled_from(options)


def _key_value(key: str):
    return st.tuples(st.just(key), st.one_of(_plausible(key), _plausible(key), VALUES))


CHANGES = st.lists(KEYS.flatmap(_key_value), min_size=1, max_size=3).map(dict)


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):  # a value hypothesis reuses must be written out twice, not as an alias
        return True


def _nested(changes: dict) -> dict:
    tree: dict = {}
    for key, value in changes.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[leaf] = value
    return tree


def _load(route: str, changes: dict, tmp: Path) -> Config:
    if route == "kwargs":
        return load_config(None, **changes)
    if route == "yaml":
        path = tmp / "fuzz.yaml"
        path.write_text(yaml.dump(_nested(changes), Dumper=_NoAliases, allow_unicode=True) or "{}\n", encoding="utf-8")
        return load_config(path)
    args = []
    for key, value in changes.items():
        raw = value if isinstance(value, str) else yaml.dump(value, Dumper=_NoAliases, default_flow_style=True,
                                                                 allow_unicode=True).strip().removesuffix("...").strip()
        args += [f"--{key}", raw]
    return load_config(None, args)


@pytest.fixture(scope="module")
def tmp():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(changes=CHANGES,
       route=st.sampled_from(["kwargs", "yaml", "override"]))
def test_a_config_is_in_its_domains_or_one_config_error_names_the_field(tmp, changes, route):
    try:
        cfg = _load(route, changes, tmp)
    except ConfigError as e:
        event(f"{route}: ConfigError")  # pytest --hypothesis-show-statistics: how often each outcome came up
        msg = str(e)
        assert "\n" not in msg and len(msg) < 500, msg
        assert any(k.split(".")[0] in msg for k in changes), f"names no fuzzed field: {msg!r} for {changes!r}"
        assert any(k in msg for k in all_keys()), f"names no field: {msg!r}"
        return
    event(f"{route}: a Config")
    for key in LEAVES:
        value = _get(cfg, key)
        if key != "model.quantize" and value is not _ABSENT:
            assert in_documented_domain(key, value), f"{key} = {value!r} is outside its documented domain ({route})"


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), st.text(_CHARS, max_size=300).map(lambda s: s.encode("utf-8"))))
def test_any_bytes_as_a_yaml_file_are_a_mapping_or_one_config_error(tmp, raw):
    path = tmp / "bytes.yaml"
    path.write_bytes(raw)
    try:
        tree = read_yaml_config(path)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        return
    assert isinstance(tree, dict)
    try:
        load_config(path)
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 500
