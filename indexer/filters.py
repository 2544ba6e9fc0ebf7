"""Typed filters over the attributes stored with each item vector (``attrs``: the catalogue features).

The API, the CLI and the library take these models instead of a vector store's own expression syntax,
so that a store can be replaced without changing the API, and each store compiles them with every
value escaped (no value can change what an expression means). JSON forms:

    {"field": "year", "op": ">=", "value": 1990}               ==, !=, <, <=, >, >=
    {"field": "genres", "op": "in", "value": ["Drama", "War"]}  one value type per list
    {"all": [filter, ...]}   {"any": [filter, ...]}   {"not": filter}

Fields name feature keys (identifiers). Values are strings, integers (64-bit), finite floats or
booleans, typed as JSON types them: ``"1990"`` does not equal ``1990``. An item without the field
fails every condition but ``!=`` (and so passes their ``not``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictFloat,
                      StrictInt, StrictStr, Tag, TypeAdapter, ValidationError, model_validator)

from core.errors import OnetowerError

FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
MAX_TERMS = 64  # conditions and combinators in one filter: a store's parser, not the client, pays for more
ORDERED_OPS = ("<", "<=", ">", ">=")


class InvalidFilter(OnetowerError, ValueError):
    """A filter that does not validate, or that the vector store rejected; the message says why."""


Text = Annotated[StrictStr, Field(max_length=1024)]  # pydantic rejects lone surrogates, which no store could encode
Integer = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Scalar = Union[Text, Integer, Number, StrictBool]


class Condition(BaseModel):
    """``attrs[field] op value``; ``in`` takes a list of values of one type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: Annotated[str, Field(pattern=FIELD_PATTERN)]
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in"]
    value: Union[Scalar, Annotated[list[Scalar], Field(min_length=1, max_length=1000)]]

    @model_validator(mode="after")
    def _typed(self) -> Condition:
        values = self.value if isinstance(self.value, list) else [self.value]
        if (self.op == "in") != isinstance(self.value, list):
            raise ValueError("'in' takes a list of values, every other op one value")
        if len({type(v) for v in values}) > 1:  # Milvus 2.3 fails a mixed list with an internal error
            raise ValueError("the values of 'in' must all have one type")
        if self.op in ORDERED_OPS and isinstance(values[0], bool):
            raise ValueError(f"{self.op!r} compares numbers or strings, not booleans")
        return self


class AllOf(BaseModel):
    """Every filter holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    all: Annotated[list[Filter], Field(min_length=1)]


class AnyOf(BaseModel):
    """At least one filter holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    any: Annotated[list[Filter], Field(min_length=1)]


class Not(BaseModel):
    """The filter does not hold."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True)

    not_: Filter = Field(alias="not")


def _form(value: Any) -> str | None:
    """Which form a filter has, so that a validation error speaks of that form only."""
    if isinstance(value, dict):
        keys = {"field": Condition, "all": AllOf, "any": AnyOf, "not": Not}
        return next((model.__name__ for key, model in keys.items() if key in value), None)
    return type(value).__name__ if isinstance(value, (Condition, AllOf, AnyOf, Not)) else None


def _terms(f: Filter) -> int:
    """How many conditions and combinators ``f`` holds."""
    match f:
        case AllOf(all=parts) | AnyOf(any=parts):
            return 1 + sum(_terms(part) for part in parts)
        case Not(not_=part):
            return 1 + _terms(part)
    return 1


def _bounded(f: Filter) -> Filter:
    if _terms(f) > MAX_TERMS:
        raise ValueError(f"a filter holds at most {MAX_TERMS} conditions and combinators")
    return f


Filter = Annotated[
    Union[Annotated[Condition, Tag("Condition")], Annotated[AllOf, Tag("AllOf")], Annotated[AnyOf, Tag("AnyOf")],
          Annotated[Not, Tag("Not")]],
    Discriminator(_form, custom_error_type="filter_form",
                  custom_error_message="a filter is an object with 'field', 'all', 'any' or 'not'"),
    AfterValidator(_bounded),
]
for _model in (AllOf, AnyOf, Not):
    _model.model_rebuild()
_adapter: TypeAdapter[Filter] = TypeAdapter(Filter)


def parse_filter(text: str) -> Filter:
    """A filter from its JSON form (the GET ``filter`` parameter, ``--filter``); InvalidFilter says why not."""
    try:
        return _adapter.validate_json(text)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'filter'}: {e['msg']}" for e in exc.errors())
        raise InvalidFilter(f"invalid filter: {reasons}") from None
