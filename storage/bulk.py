"""``column IN <a list bound as ONE parameter>`` for the hot paths of batched writes.

SQLAlchemy's expanding ``IN`` renders one placeholder per value on every execution; for a batch
of 1,000 labels that cost several times the query itself. Here the list is a single bound
parameter instead: a JSON array read with ``json_each`` on SQLite, an array compared with
``= ANY(...)`` on PostgreSQL. Both plans still seek the index per value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Dialect, Integer, String, any_, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import TypeDecorator, TypeEngine


class ValueList(TypeDecorator[Any]):
    """A Python list bound as a JSON text (SQLite) or a typed array (PostgreSQL)."""

    impl = String
    cache_ok = True

    def __init__(self, item: type[Integer] | type[String]) -> None:
        self.item = item
        super().__init__()

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(self.item()))
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: Iterable[Any] | None, dialect: Dialect) -> Any:
        values = list(value or ())
        return values if dialect.name == "postgresql" else json.dumps(values)


def in_values(
    dialect: str, column: ColumnElement[Any], name: str, item: type[Integer] | type[String]
) -> ColumnElement[bool]:
    """``column IN (:name)`` where ``:name`` is bound to a whole list of ``item`` values."""
    param = bindparam(name, type_=ValueList(item))
    if dialect == "postgresql":
        return column == any_(param)
    return column.in_(select(func.json_each(param).table_valued("value").c.value))
