"""Deterministic values that satisfy a JSON Schema: the emulator's "model" for tool inputs
and JSON-schema output.

``value_for(schema, seed)`` walks the schema once and draws every free choice (enum label,
number, string length, whether an optional property appears, array length) from a tiny
PRNG seeded by the prompt hash. The same prompt therefore always yields the same value, and
different prompts spread over the enum labels, so a label distribution is visible in
exported results.

Supported keywords: ``type`` (single or a list such as ``["string", "null"]``), ``const``,
``enum``, ``properties``/``required``, ``additionalProperties`` (only listed properties are
produced), ``items``/``prefixItems``/``minItems``/``maxItems``/``uniqueItems``,
``minLength``/``maxLength``, a few string ``format``s (date-time, date, time, email, uri,
uuid), ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``/``multipleOf``,
``anyOf``/``oneOf`` (the first branch), ``allOf`` (merged) and local ``$ref``s (``#/$defs/…``,
``#/definitions/…``), as pydantic's ``model_json_schema()`` emits them. ``pattern`` is not
honoured: a generator for arbitrary regular expressions is out of scope for an emulator.

Everything here is plain dict/list walking with integer arithmetic, so it is cheap enough to
run for each of 100,000 requests in a batch.
"""

from __future__ import annotations

import math
from typing import Any

# Nesting below this depth only produces what the schema requires (required properties,
# minItems elements, null where allowed), so recursive schemas terminate.
_MAX_DEPTH = 8
# A schema that requires nesting deeper than this has no finite instance; stop there.
_GIVE_UP_DEPTH = 64

# Words for generated strings. Fixed, so values are stable across releases of Python.
_WORDS = (
    "alpha", "bravo", "cedar", "delta", "ember", "fjord", "gamma", "harbor",
    "indigo", "juniper", "kelp", "lumen", "maple", "nectar", "onyx", "prism",
    "quartz", "raven", "sierra", "tundra", "umber", "velvet", "willow", "zephyr",
)  # fmt: skip

_MASK64 = (1 << 64) - 1


class Draws:
    """A 64-bit linear congruential generator: cheap, deterministic, good enough to pick labels.

    (``random.Random`` would do, but seeding one per request costs more than the whole walk.)
    """

    __slots__ = ("_state",)

    def __init__(self, seed: bytes) -> None:
        self._state = int.from_bytes(seed[:8].ljust(8, b"\0"), "little") | 1

    def below(self, n: int) -> int:
        """An integer in ``[0, n)``; 0 when ``n`` is not positive."""
        if n <= 1:
            return 0
        self._state = (self._state * 6364136223846793005 + 1442695040888963407) & _MASK64
        # The high bits of an LCG are the well-mixed ones.
        return (self._state >> 33) % n


def value_for(schema: object, seed: bytes) -> Any:
    """A JSON value valid for ``schema`` (a JSON Schema as a dict, or a boolean schema)."""
    root = schema if isinstance(schema, dict) else {}
    return _Generator(root, Draws(seed)).value(schema, 0)


class _Generator:
    """One walk over one schema; holds the root (for ``$ref``) and the draws."""

    __slots__ = ("_draws", "_root")

    def __init__(self, root: dict[str, Any], draws: Draws) -> None:
        self._root = root
        self._draws = draws

    def value(self, schema: object, depth: int) -> Any:
        if depth > _GIVE_UP_DEPTH:
            # Only a schema that requires infinite nesting gets here; no value can satisfy it.
            return None
        if not isinstance(schema, dict):
            # ``true`` (or garbage): anything goes; a word is the most readable "anything".
            return self._word()
        schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[self._draws.below(len(enum))]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                # The first branch, keeping sibling keywords; past the depth cap a null branch
                # if there is one, so recursive schemas (child: Item | None) terminate.
                branch = branches[0]
                if depth >= _MAX_DEPTH:
                    branch = next((b for b in branches if _is_null(b)), branch)
                rest = {k: v for k, v in schema.items() if k != key}
                return self.value({**rest, **self._resolve(branch)}, depth)
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and all_of:
            return self.value(self._merge(schema, all_of), depth)
        return self._typed(schema, self._pick_type(schema, depth), depth)

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Follow local ``$ref``s (a handful of hops at most; cycles stop at an empty schema)."""
        for _ in range(16):
            ref = schema.get("$ref")
            if not isinstance(ref, str) or not ref.startswith("#"):
                return schema
            target: Any = self._root
            for part in ref[1:].split("/"):
                if not part:
                    continue
                key = part.replace("~1", "/").replace("~0", "~")
                target = target.get(key) if isinstance(target, dict) else None
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, dict) else rest
        return {}

    def _merge(self, schema: dict[str, Any], parts: list[Any]) -> dict[str, Any]:
        """``allOf`` as one schema: later keywords win, properties and required are united."""
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        props: dict[str, Any] = dict(merged.get("properties") or {})
        required: list[str] = list(merged.get("required") or [])
        for raw in parts:
            if not isinstance(raw, dict):
                continue
            part = self._resolve(raw)
            merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
            props.update(part.get("properties") or {})
            required.extend(r for r in part.get("required") or [] if r not in required)
        if props:
            merged["properties"] = props
        if required:
            merged["required"] = required
        return merged

    def _pick_type(self, schema: dict[str, Any], depth: int) -> str:
        declared = schema.get("type")
        if isinstance(declared, str):
            return declared
        if isinstance(declared, list) and declared:
            concrete = [t for t in declared if t != "null"]
            if not concrete:
                return "null"
            # Mostly a real value, sometimes null (a model does leave nullable fields empty),
            # and always null once nesting gets deep.
            if len(concrete) < len(declared) and (depth >= _MAX_DEPTH or self._draws.below(8) == 0):
                return "null"
            return str(concrete[0])
        if "properties" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        return "string"

    def _typed(self, schema: dict[str, Any], kind: str, depth: int) -> Any:
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self._draws.below(2) == 1
        if kind == "null":
            return None
        return self._string(schema)

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        required = schema.get("required")
        required_set = set(required) if isinstance(required, list) else set()
        out: dict[str, Any] = {}
        for name, sub in props.items():
            # Optional properties appear three times in four, and never past the depth cap.
            if name not in required_set and (depth >= _MAX_DEPTH or self._draws.below(4) == 0):
                continue
            out[name] = self.value(sub, depth + 1)
        return out

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        low = _int_or(schema.get("minItems"), 0)
        high = _int_or(schema.get("maxItems"), max(low, 3))
        high = max(low, high)
        count = (
            low if depth >= _MAX_DEPTH else low + self._draws.below(min(high, low + 3) - low + 1)
        )
        prefix = schema.get("prefixItems")
        prefix_list = prefix if isinstance(prefix, list) else []
        count = max(count, min(len(prefix_list), high))
        items = schema.get("items", {})
        unique = schema.get("uniqueItems") is True
        out: list[Any] = []
        attempts = 0
        while len(out) < count and attempts < count * 4 + 8:
            index = len(out)
            sub = prefix_list[index] if index < len(prefix_list) else items
            item = self.value(sub, depth + 1)
            attempts += 1
            if unique and item in out:
                continue
            out.append(item)
        return out

    def _integer(self, schema: dict[str, Any]) -> int:
        low, high = _bounds(schema, 0, 100)
        low_i = math.ceil(low) + (1 if _exclusive(schema, "Minimum", low) else 0)
        high_i = math.floor(high) - (1 if _exclusive(schema, "Maximum", high) else 0)
        step = schema.get("multipleOf")
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            first = -(-low_i // step) * step
            slots = (high_i - first) // step + 1
            return first + step * self._draws.below(slots) if slots > 0 else first
        if high_i < low_i:
            return low_i
        return low_i + self._draws.below(high_i - low_i + 1)

    def _number(self, schema: dict[str, Any]) -> float | int:
        low, high = _bounds(schema, 0.0, 100.0)
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
            first = math.ceil(low / step)
            slots = max(0, math.floor(high / step) - first + 1)
            if isinstance(step, int):
                n = first + self._draws.below(slots)
                if _exclusive(schema, "Minimum", low) and n * step <= low:
                    n += 1
                if _exclusive(schema, "Maximum", high) and n * step >= high:
                    n -= 1
                return n * step
            return self._float_multiple(schema, step, first, slots, (low, high))
        # Hundredths inside the bounds, nudged off an exclusive edge.
        span = max(0, math.floor((high - low) * 100))
        value = low + self._draws.below(span + 1) / 100
        if _exclusive(schema, "Minimum", low) and value <= low:
            value = low + (high - low) / 2 if high > low else low
        if _exclusive(schema, "Maximum", high) and value >= high:
            value = low + (high - low) / 2
        return round(value, 6)

    def _float_multiple(
        self,
        schema: dict[str, Any],
        step: float,
        first: int,
        slots: int,
        bounds: tuple[float, float],
    ) -> float:
        """A multiple of a fractional step that validators accept as one.

        Validators test ``value / step`` for integrality in binary floating point, where
        2.4 / 0.1 is 23.999999999999996; so walk from a drawn slot to one that divides exactly
        (for steps like 0.1 every few slots do) and is inside any exclusive bound.
        """
        low, high = bounds
        start = self._draws.below(slots)
        for k in range(min(max(slots, 1), 1000)):  # bounded: never a long search
            value = round((first + (start + k) % max(slots, 1)) * step, 10)
            if (value / step).is_integer() and not (
                (_exclusive(schema, "Minimum", low) and value <= low)
                or (_exclusive(schema, "Maximum", high) and value >= high)
            ):
                return value
        return round(first * step, 10)

    def _string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        text = self._formatted(fmt) if isinstance(fmt, str) else None
        if text is None:
            text = self._word()
            if self._draws.below(2):
                text = f"{text} {self._word()}"
        low = _int_or(schema.get("minLength"), 0)
        high = _int_or(schema.get("maxLength"), max(len(text), low))
        while len(text) < low:
            text = f"{text} {self._word()}"
        # Trim trailing spaces a cut may leave, unless that would break minLength.
        cut = text[: max(low, min(high, len(text)))]
        stripped = cut.rstrip()
        return stripped if len(stripped) >= low else cut

    def _formatted(self, fmt: str) -> str | None:
        d = self._draws
        if fmt == "date-time":
            return f"2026-{1 + d.below(12):02d}-{1 + d.below(28):02d}T{d.below(24):02d}:00:00Z"
        if fmt == "date":
            return f"2026-{1 + d.below(12):02d}-{1 + d.below(28):02d}"
        if fmt == "time":
            return f"{d.below(24):02d}:{d.below(60):02d}:00Z"
        if fmt == "email":
            return f"{self._word()}@example.com"
        if fmt in ("uri", "url"):
            return f"https://example.com/{self._word()}"
        if fmt == "uuid":
            h = "".join(f"{d.below(1 << 16):04x}" for _ in range(8))
            return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"
        return None

    def _word(self) -> str:
        return _WORDS[self._draws.below(len(_WORDS))]


def _is_null(schema: object) -> bool:
    return isinstance(schema, dict) and (
        schema.get("type") == "null" or schema.get("const", 0) is None
    )


def _int_or(value: object, default: int) -> int:
    """A non-negative integer keyword, or the default when absent or malformed."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default


def _bounds(schema: dict[str, Any], low: float, high: float) -> tuple[float, float]:
    """The tightest numeric bounds; an open side sits ``high - low`` away from the other."""
    los = [
        v
        for v in (_num(schema.get("minimum")), _num(schema.get("exclusiveMinimum")))
        if v is not None
    ]
    his = [
        v
        for v in (_num(schema.get("maximum")), _num(schema.get("exclusiveMaximum")))
        if v is not None
    ]
    lo = max(los) if los else None
    hi = min(his) if his else None
    if lo is None and hi is None:
        return low, high
    if lo is None:
        assert hi is not None
        return min(low, hi - (high - low)), hi
    if hi is None:
        return lo, lo + (high - low)
    return lo, max(lo, hi)


def _num(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _exclusive(schema: dict[str, Any], side: str, edge: float) -> bool:
    """Whether the bound at ``edge`` is exclusive (2020-12 numeric form, or draft-4 boolean)."""
    numeric = schema.get(f"exclusive{side}")
    if isinstance(numeric, bool):
        return numeric
    return _num(numeric) == edge
