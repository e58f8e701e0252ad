"""Naming the nested field at fault when a row fails its template.

jinja2 reports a missing nested field as "'dict object' has no attribute 'langg'" and a
printed null as nothing at all. A typo in ``{{ meta.langg }}`` fails every row, so the
message should say which lookup, as the template wrote it, and what the object holds:
``meta.langg is missing (meta has: lang, tags, prio)``. This module reads the lookups out
of the templates once and explains a failed row against them, and holds what templates
see instead of a null (:data:`NULL`) and of a missing field (:class:`StrictLookupUndefined`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import jinja2
import orjson

# How many of an object's fields a "… is missing" message lists.
_FIELDS_SHOWN = 20

_MISSING: Any = object()

# A chain of attribute or constant-subscript lookups from a name: ("meta", "lang") for
# {{ meta.lang }}, ("row", "product name") for {{ row["product name"] }}.
Path = tuple[str | int, ...]


class UndefinedLookup(jinja2.UndefinedError):
    """An undefined value was used; keeps what was looked up (``name``) in what (``obj``)."""

    def __init__(self, message: str | None = None, *, obj: Any, name: Any) -> None:
        super().__init__(message)
        self.obj = obj
        self.name = name


class NullPrinted(Exception):
    """A template printed a null value (raised by render._finalize, turned into a RowProblem)."""


class Null:
    """A null value as a Jinja template sees it (a null column, or a null field the
    renderer's lookups read): false, so `{{ body or 'none' }}`, `{% if body %}` and
    `default('x', true)` say what to print instead; but never text. A bare None would print
    through a filter as "None" (`{{ body | upper }}` gives "NONE", sent and paid for):
    turned into text, this refuses the row instead."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return other is None or other is self  # `== none` holds, as for the None it stands for

    def __hash__(self) -> int:
        return hash(None)

    def __str__(self) -> str:
        raise NullPrinted

    def __iter__(self) -> Any:
        raise NullPrinted


NULL = Null()


class StrictLookupUndefined(jinja2.StrictUndefined):
    """jinja2's StrictUndefined, whose error keeps which object lacked which field.

    Tested too (`{% if meta.lagn %}`, `meta.lagn or 'x'`) it fails the row: a mistyped
    field would otherwise drop or invert a condition on every row, silently and paid for.
    `| default('x')` and `is defined` are the ways to say a field may be absent.
    """

    __slots__ = ()

    def __init__(
        self,
        hint: str | None = None,
        obj: Any = jinja2.utils.missing,
        name: Any = None,
        exc: Any = None,
    ) -> None:
        # Every use of an undefined value (printing it, adding to it …) raises through this
        # factory. jinja2 only calls it with the message, so a partial serves as the class.
        factory = functools.partial(UndefinedLookup, obj=obj, name=name)
        super().__init__(hint, obj, name, cast("type[jinja2.TemplateRuntimeError]", factory))


class NullLookup(StrictLookupUndefined):
    """A field read from a null (``meta.lang`` when ``meta`` is null, at any depth): absent,
    so `| default('x')` and `is defined` say so, and false, so `or` and `if` give their
    default; printed or used in any other way it fails the row, naming the null."""

    __slots__ = ()

    def __bool__(self) -> bool:  # type: ignore[override]  # StrictUndefined's raises
        return False


def _lookup_path(node: jinja2.nodes.Node) -> Path | None:
    """The path a Getattr/Getitem/Name node reads, or None for anything else."""
    if isinstance(node, jinja2.nodes.Name):
        return (node.name,)
    if isinstance(node, jinja2.nodes.Getattr):
        head = _lookup_path(node.node)
        return None if head is None else (*head, node.attr)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const):
        key = node.arg.value
        head = _lookup_path(node.node)
        if head is None or not isinstance(key, str | int) or isinstance(key, bool):
            return None
        return (*head, key)
    return None


def show_path(path: Path) -> str:
    """``meta.lang``, ``row["product name"]``, ``meta.tags[0]``: as a template writes it."""
    out = str(path[0])
    for part in path[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}"
        else:
            out += f"[{orjson.dumps(part).decode()}]"
    return out


class TemplateLookups:
    """The nested lookups of a job's templates, to explain a row that failed on one.

    ``row_name`` is the name that stands for the whole row (``row``), when the templates
    use it and the input has no column of that name.
    """

    def __init__(self, asts: Iterable[jinja2.nodes.Template], row_name: str | None) -> None:
        self._row_name = row_name
        self._all: list[Path] = []
        self._printed: list[Path] = []  # printed as they are: {{ a.b }}
        for ast in asts:
            for node in ast.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem)):
                path = _lookup_path(node)
                if path is not None and path not in self._all:
                    self._all.append(path)
            for output in ast.find_all(jinja2.nodes.Output):
                for child in output.nodes:
                    path = _lookup_path(child)
                    # Names too: a null column a Jinja template prints is refused as it
                    # renders (render.RequestRenderer), and named here.
                    if path is not None and path not in self._printed:
                        self._printed.append(path)

    def _null_prefix(self, row: Mapping[str, Any], path: Path) -> Path | None:
        """The shortest part of ``path`` that is null in ``row`` (``meta`` of
        ``meta.info.lang``), short of the whole; None if none is."""
        for end in range(1, len(path)):
            if self._resolve(row, path[:end]) is None:
                return path[:end]
        return None

    def _resolve(self, row: Mapping[str, Any], path: Path) -> Any:
        """The value ``path`` reads in ``row``, or _MISSING where it reads nothing."""
        head = str(path[0])  # paths start at a name
        if head in row:
            value: Any = row[head]
        elif head == self._row_name:
            value = row
        else:
            return _MISSING  # a loop variable or a {% set %}: not the row's
        for part in path[1:]:
            if isinstance(value, Mapping) and isinstance(part, str):
                value = value.get(part, _MISSING)
            elif isinstance(value, list) and isinstance(part, int):
                value = value[part] if -len(value) <= part < len(value) else _MISSING
            else:
                return _MISSING
            if value is _MISSING:
                return _MISSING
        return value

    def missing_field(self, row: Mapping[str, Any], exc: jinja2.UndefinedError) -> str:
        """What a row's UndefinedError means: the lookup, as written, and the fields there."""
        obj = getattr(exc, "obj", None)
        name = getattr(exc, "name", None)
        if obj is None or obj is NULL or isinstance(obj, NullLookup):
            for path in self._all:
                null = self._null_prefix(row, path) if path[-1] == name else None
                if null is not None:
                    return _null_message(show_path(path), null=show_path(null))
        if isinstance(obj, Mapping) and name not in obj:
            for path in self._all:
                if path[-1] == name and self._resolve(row, path[:-1]) is obj:
                    names = [str(k) for k in obj]
                    fields = ", ".join(names[:_FIELDS_SHOWN]) or "no fields"
                    if len(names) > _FIELDS_SHOWN:
                        fields += f" … {len(names) - _FIELDS_SHOWN} more"
                    return (
                        f"template: {show_path(path)} is missing "
                        f"({show_path(path[:-1])} has: {fields}); fix the template or the data"
                    )
        return f"template: {exc.message}"

    def null_field(self, row: Mapping[str, Any], null_columns: Sequence[str] = ()) -> str:
        """What a printed null means: the field that is null in this row, where it is known;
        else the first of ``null_columns`` (the row's null columns, which a filter may have
        turned into text: `{{ body | upper }}`)."""
        for path in self._printed:
            if self._resolve(row, path) is None:
                return _null_message(show_path(path))
            null = self._null_prefix(row, path)  # meta.info.lang where meta.info is null
            if null is not None:
                return _null_message(show_path(path), null=show_path(null))
        for path in self._all:  # not printed bare: through a filter ({{ meta.lang | upper }})
            if self._resolve(row, path) is None:
                return _null_message(show_path(path))
        if null_columns:
            return _null_message(null_columns[0])
        return (
            "template prints a null value (a nested field that is null, say); "
            "write {{ field or '' }} where an empty value is fine"
        )


def _null_message(shown: str, null: str | None = None) -> str:
    what = f"{shown} is null" if null is None else f"{null} is null, so {shown} is too,"
    return (
        f"template prints a null value: {what} in this row; "
        f"write {{{{ {shown} or '' }}}} where an empty value is fine"
    )
