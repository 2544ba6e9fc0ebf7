"""Typed filters: validation, the JSON form, and their Milvus expressions (no server: test_indexer.py
runs them against Milvus). The property tests check that no value, whatever its characters, can add
anything to an expression but one literal."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from indexer.filters import MAX_TERMS, AllOf, AnyOf, Condition, InvalidFilter, Not, parse_filter
from indexer.milvus import compile_filter, id_filter

GO_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')  # one double-quoted Go string literal, as Milvus lexes it
SKELETON = re.compile(r"(?:attrs\[S\]|S|==|!=|<=|>=|<|>|\bin\b|\band\b|\bor\b|\bnot\b|\btrue\b|\bfalse\b"
                      r"|-?\d[\d.e+-]*|[()\[\],]|\s)*")


def where(field: str, op: str, value: object) -> Condition:
    return Condition(field=field, op=op, value=value)


@pytest.mark.parametrize("f, expr", [
    (where("year", ">=", 1990), 'attrs["year"] >= 1990'),
    (where("year", "<", -3), 'attrs["year"] < -3'),
    (where("rating", ">", 3.5), 'attrs["rating"] > 3.5'),
    (where("rating", "<=", 1e300), 'attrs["rating"] <= 1e+300'),
    (where("adult", "==", False), 'attrs["adult"] == false'),
    (where("genres", "!=", "Drama"), 'attrs["genres"] != "Drama"'),
    (where("genres", "in", ["Drama", "War"]), 'attrs["genres"] in ["Drama", "War"]'),
    (where("year", "in", [1990]), 'attrs["year"] in [1990]'),
    (AllOf(all=[where("year", ">=", 1990), AnyOf(any=[where("a", "==", 1), Not(not_=where("b", "==", True))])]),
     '(attrs["year"] >= 1990) and ((attrs["a"] == 1) or (not (attrs["b"] == true)))'),
])
def test_compiles_to_hand_checked_expressions(f, expr: str) -> None:
    assert compile_filter(f) == expr


@pytest.mark.parametrize("value, literal", [
    ('x" or 1==1 or "', r'"x\" or 1==1 or \""'),
    ("back\\slash\\", r'"back\\slash\\"'),
    ("it's", '"it\'s"'),
    ("line\nbreak\ttab\x00", r'"line\nbreak\ttab\u0000"'),
    ("é😀\u2028", '"é😀\u2028"'),  # raw: Go rejects JSON's surrogate-pair escapes
])
def test_strings_are_escaped(value: str, literal: str) -> None:
    assert compile_filter(where("title", "==", value)) == f'attrs["title"] == {literal}'


def test_ids_are_escaped_the_same_way() -> None:
    assert id_filter("id", ["9'33", 'a"b']) == 'id in ["9\'33", "a\\"b"]'


def test_the_json_form() -> None:
    text = '{"all": [{"field": "year", "op": ">=", "value": 1990}, {"not": {"field": "genres", "op": "in", "value": ["War"]}}]}'
    f = parse_filter(text)
    assert f == AllOf(all=[where("year", ">=", 1990), Not(not_=where("genres", "in", ["War"]))])
    assert json.loads(f.model_dump_json()) == json.loads(text)
    assert parse_filter('{"field": "year", "op": "==", "value": "1990"}').value == "1990"  # typed as JSON types it


@pytest.mark.parametrize("text, reason", [
    ('{"field": "year\\"] or 1==1 or attrs[\\"x", "op": "==", "value": 1}', "should match pattern"),
    ('{"field": "a b", "op": "==", "value": 1}', "should match pattern"),
    ('{"field": "1st", "op": "==", "value": 1}', "should match pattern"),
    ('{"field": "year", "op": "~=", "value": 1}', "Input should be"),
    ('{"field": "year", "op": "in", "value": 1990}', "'in' takes a list"),
    ('{"field": "year", "op": "==", "value": [1990]}', "'in' takes a list"),
    ('{"field": "year", "op": "in", "value": []}', "at least 1 item"),
    ('{"field": "year", "op": "in", "value": [1990, 1.5]}', "one type"),
    ('{"field": "year", "op": "in", "value": [1, true]}', "one type"),
    ('{"field": "adult", "op": "<", "value": true}', "not booleans"),
    ('{"field": "year", "op": "==", "value": NaN}', "finite"),
    ('{"field": "year", "op": "==", "value": null}', "Input should be"),
    ('{"field": "year", "op": "==", "value": {"$gt": 1}}', "Input should be"),
    ('{"field": "year", "op": "==", "value": 1, "or": 1}', "Extra inputs"),
    ('{"all": []}', "at least 1 item"),
    ('{"where": 1}', "'field', 'all', 'any' or 'not'"),
    ('"attrs[\\"year\\"] >= 1990"', "'field', 'all', 'any' or 'not'"),
    ('{"field": "year", "op": "==", "value": "\\ud800"}', "Invalid JSON"),
    ("{", "Invalid JSON"),
    ('{"not": ' * 2000 + "1" + "}" * 2000, "Invalid JSON"),
    ('{"any": [' + ", ".join(['{"field": "a", "op": "==", "value": 1}'] * MAX_TERMS) + "]}", f"at most {MAX_TERMS}"),
])
def test_invalid_filters_say_why(text: str, reason: str) -> None:
    with pytest.raises(InvalidFilter, match=re.escape(reason)):
        parse_filter(text)


def test_values_are_checked_from_python_too() -> None:
    """Python's own JSON parser (FastAPI's body) lets lone surrogates and integers of any size through."""
    with pytest.raises(ValidationError, match="unable to parse raw data as a unicode string"):
        where("title", "==", "\ud800")
    assert compile_filter(where("year", "==", 2**63 - 1)) == f'attrs["year"] == {2**63 - 1}'
    assert where("year", "==", 2**63).value == float(2**63)  # past 64 bits an integer compares as a float
    with pytest.raises(ValidationError):
        where("year", "==", 10**400)


fields = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
scalars = st.one_of(st.text(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
                    st.booleans())
conditions = st.one_of(
    st.builds(where, fields, st.sampled_from(["==", "!="]), scalars),
    st.builds(where, fields, st.sampled_from(["<", "<=", ">", ">="]), st.one_of(st.text(), st.integers(-(2**63), 2**63 - 1))),
    st.builds(where, fields, st.just("in"), st.one_of(st.lists(st.text(), min_size=1, max_size=4),
                                                      st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4))),
)
filters = st.recursive(conditions, lambda inner: st.one_of(
    st.builds(lambda parts: AllOf(all=parts), st.lists(inner, min_size=1, max_size=3)),
    st.builds(lambda parts: AnyOf(any=parts), st.lists(inner, min_size=1, max_size=3)),
    st.builds(lambda part: Not(not_=part), inner)), max_leaves=12)


def leaves(f) -> int:
    match f:
        case AllOf(all=parts) | AnyOf(any=parts):
            return sum(map(leaves, parts))
        case Not(not_=part):
            return leaves(part)
    return 1


@settings(max_examples=300)
@given(st.text())
def test_any_string_is_one_literal_that_decodes_to_itself(value: str) -> None:
    expr = compile_filter(where("title", "==", value))
    literal = expr.removeprefix('attrs["title"] == ')
    assert GO_STRING.fullmatch(literal), expr
    assert json.loads(literal) == value


@settings(max_examples=300)
@given(filters)
def test_values_add_nothing_but_literals(f) -> None:
    """With every string literal taken out, what remains is the filter's own skeleton: no value added
    an operator, a parenthesis or a field; and the JSON form round-trips."""
    expr = compile_filter(f)
    assert SKELETON.fullmatch(GO_STRING.sub("S", expr)), expr
    assert GO_STRING.sub("S", expr).count("attrs[S]") == leaves(f)
    assert parse_filter(f.model_dump_json()) == f
