"""Canonical msgpack and strict schemas.

Every value the toolkit signs or sends is a msgpack map with string keys. The canonical
encoding is the one :func:`pack` produces: keys sorted by their UTF-8 bytes, the shortest
form for every integer and length (msgpack-python already does this), ``bin`` for bytes,
``str`` for text, no floats, no extension types. :func:`unpack` accepts exactly the
canonical encoding: it refuses duplicate keys, non-string keys, extension types, floats,
trailing bytes and any input that does not re-encode to the same bytes.

Every failure raises :class:`~tisa.errors.ProtocolError`, never a msgpack exception.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import msgpack

from tisa.errors import ProtocolError

__all__ = ["Field", "check_map", "pack", "pack_checked", "unpack"]

# Depth of nested containers accepted; our schemas need 4, more is an attack on the
# recursion of the decoder and of our validators.
MAX_DEPTH = 8


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _fail(detail: str) -> NoReturn:
    raise ProtocolError(detail)


# The types that encode as they are (None is handled with them: type(None)).
_PLAIN = frozenset({bytes, str, int, bool, type(None)})


def _canonical(value: Any, depth: int = 0) -> Any:
    # Exact type checks: cheaper than isinstance with ABCs on this hot path, and the
    # protocol only ever builds plain dicts, lists and tuples. Text that is not valid
    # Unicode (a lone surrogate) and integers out of msgpack's range are left to the
    # packer, which refuses exactly those (pack translates its errors): checking them
    # here as well cost about 5% of the originator's core time.
    kind = type(value)
    if kind is bytes or kind is str or kind is int or kind is bool or value is None:
        return value
    if depth >= MAX_DEPTH:
        _fail("nesting too deep")
    if kind is dict:
        for key in value:
            if type(key) is not str:
                _fail("map key is not a string")
        # UTF-8 preserves code point order, so sorting the str keys sorts their bytes.
        # A plain scalar is taken as it is, without a call (most values are).
        return {
            key: item if type(item) in _PLAIN else _canonical(item, depth + 1)
            for key in sorted(value)
            for item in (value[key],)
        }
    if kind is list or kind is tuple:
        return [item if type(item) in _PLAIN else _canonical(item, depth + 1) for item in value]
    if isinstance(value, Mapping):
        return _canonical(dict(value), depth)
    # Subclasses (StrEnum reason codes, IntEnum) encode as their plain value.
    if isinstance(value, str):
        return _canonical(str(value), depth)
    if isinstance(value, int):
        return _canonical(int(value), depth)
    _fail(f"cannot encode {kind.__name__}")


def pack(value: Mapping[str, Any]) -> bytes:
    """Encode ``value`` canonically.

    Raises:
        ProtocolError: a value of a type the protocol does not carry (float, set, ...).
    """
    canonical = _canonical(value)
    try:
        packed: bytes = msgpack.packb(canonical, use_bin_type=True)
    except UnicodeEncodeError:
        # A lone surrogate: Python holds it, UTF-8 (and so msgpack) cannot.
        _fail("text is not valid Unicode")
    except OverflowError:  # outside -2**63 .. 2**64 - 1
        _fail("integer out of range")
    return packed


def pack_checked(value: dict[str, Any]) -> bytes:
    """Encode a map whose values a schema has already checked (:func:`check_map`).

    The same bytes as :func:`pack` for such a map, without its walk over every value
    (the type checks it would repeat are the schema's): keys are sorted here, at the top
    level and in maps one level down (a token's wrap, a report header's attachments in
    their list), and msgpack encodes the rest. Only for values made of bytes, str, int
    (not bool where the schema refuses it), None, lists of them, and maps of them one
    level deep, as the schemas allow; tests compare it with :func:`pack`.
    """
    return msgpack.packb(  # type: ignore[no-any-return]
        {key: _sorted_maps(item) for key, item in sorted(value.items())},
        use_bin_type=True,
    )


def _sorted_maps(item: Any) -> Any:
    kind = type(item)
    if kind is dict:
        return dict(sorted(item.items()))
    if kind is list:
        return [dict(sorted(i.items())) if type(i) is dict else i for i in item]
    return item


def _pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    # Called by the C decoder for every map: keys must be strings in strictly increasing
    # order (which also rules out duplicates). Value types are checked by _check_tree.
    previous = None
    for key, _ in pairs:
        if type(key) is not str:
            _fail("map key is not a string")
        if previous is not None and key <= previous:
            _fail("duplicate key" if key == previous else "map keys not in canonical order")
        previous = key
    return dict(pairs)


_SCALARS = frozenset({bytes, str, int, bool, type(None)})


def _check_tree(value: dict[str, Any]) -> None:
    # A float64 and a timestamp (ext -1, which msgpack decodes itself without calling
    # ext_hook) both re-encode to the bytes they came from, and msgpack bounds nesting
    # only near 1024; so one walk, without recursion, checks types and depth.
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        container, depth = stack.pop()
        if depth >= MAX_DEPTH:
            _fail("nesting too deep")
        for item in container.values() if type(container) is dict else container:
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1))
            elif kind not in _SCALARS:
                _fail(f"{'floats are' if kind is float else 'this type is'} not allowed")


def _no_ext(code: int, data: bytes) -> NoReturn:
    _fail("extension types are not allowed")


def unpack(data: bytes, *, max_size: int | None = None) -> dict[str, Any]:
    """Decode one canonical msgpack map from exactly ``data``.

    Args:
        data: the encoded bytes; nothing may follow the map.
        max_size: refuse input longer than this many bytes.

    Returns:
        The decoded map (str keys; values bytes, str, int, bool, None, list, dict).

    Raises:
        ProtocolError: anything but exactly one canonical map.
    """
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ProtocolError("input is not bytes")
        data = bytes(data)
    if max_size is not None and len(data) > max_size:
        _fail(f"encoded value too large: {len(data)} > {max_size}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_pairs_hook,
            ext_hook=_no_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types; all mean "does not decode"
        raise ProtocolError(f"not msgpack: {type(exc).__name__}") from None
    if type(value) is not dict:
        _fail("top level is not a map")
    _check_tree(value)
    # Keys were checked in order by the hook, so re-encoding in C as decoded gives the
    # canonical bytes; any other form of the same value (long int or length encodings,
    # str for bin, a float) differs here.
    if msgpack.packb(value, use_bin_type=True) != data:
        _fail("not canonical")
    return value


# --- schemas -------------------------------------------------------------------------

Field = Callable[[Any, str], Any]
"""A field checker: takes the value and its path, returns the checked value or fails."""


def check_map(value: Any, fields: Mapping[str, Field], path: str = "") -> dict[str, Any]:
    """Check that ``value`` is a map with exactly the keys of ``fields``.

    Returns a new dict of the checked values. Raises ProtocolError naming the path.
    """
    if type(value) is not dict:
        _fail(f"{path or 'value'}: expected a map")
    if len(value) != len(fields) or value.keys() != fields.keys():
        missing = fields.keys() - value.keys()
        extra = value.keys() - fields.keys()
        if missing:
            _fail(f"{path or 'value'}: missing {sorted(missing)}")
        _fail(f"{path or 'value'}: unexpected {sorted(extra)}")
    if not path:
        return {key: check(value[key], key) for key, check in fields.items()}
    # The full path of each field is only needed in an error message: check with the
    # bare key (no string built per field on this hot path) and prefix it on failure.
    try:
        return {key: check(value[key], key) for key, check in fields.items()}
    except ProtocolError as exc:
        raise ProtocolError(f"{path}.{exc.detail}") from None


def bin_exact(size: int) -> Field:
    """A field of exactly ``size`` bytes; the checker raises ProtocolError otherwise."""

    def check(value: Any, path: str) -> bytes:
        if not isinstance(value, bytes) or len(value) != size:
            _fail(f"{path}: expected {size} bytes")
        return value

    return check


def bin_max(size: int) -> Field:
    """A field of at most ``size`` bytes (or none); the checker raises ProtocolError otherwise."""

    def check(value: Any, path: str) -> bytes:
        if not isinstance(value, bytes) or len(value) > size:
            _fail(f"{path}: expected at most {size} bytes")
        return value

    return check


def text(max_bytes: int, *, allow_empty: bool = False) -> Field:
    """A text field; the checker raises ProtocolError for anything else.

    Args:
        max_bytes: the longest UTF-8 encoding allowed, in bytes.
        allow_empty: accept the empty string.

    Control characters (U+0000 to U+001F and U+007F) and lone surrogates are refused.
    """

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            _fail(f"{path}: expected text")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            _fail(f"{path}: text is not valid Unicode")
        if size > max_bytes or (size == 0 and not allow_empty):
            _fail(f"{path}: text length {size} outside 1..{max_bytes}")
        if _CONTROL.search(value):
            _fail(f"{path}: control character in text")
        return value

    return check


def uint(maximum: int = 2**64 - 1, minimum: int = 0) -> Field:
    """An integer field in ``minimum..maximum`` (inclusive); booleans are refused.

    The checker raises ProtocolError for anything else.
    """

    def check(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"{path}: expected an integer")
        if not minimum <= value <= maximum:
            _fail(f"{path}: {value} outside {minimum}..{maximum}")
        return value

    return check


def boolean(value: Any, path: str) -> bool:
    """A field checker for a boolean: returns ``value``, or raises ProtocolError naming ``path``."""
    if not isinstance(value, bool):
        _fail(f"{path}: expected a boolean")
    return value


def optional(inner: Field) -> Field:
    """A field that is None or passes ``inner`` (which then checks it)."""

    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

    return check


def one_of(*choices: str) -> Field:
    """A field equal to one of ``choices``, returned as a plain ``str``.

    The checker raises ProtocolError for anything else.
    """

    def check(value: Any, path: str) -> str:
        if value not in choices:
            _fail(f"{path}: expected one of {list(choices)}")
        return str(value)

    return check


def list_of(
    inner: Field, *, max_items: int, min_items: int = 0, unique: bool = False, sorted_: bool = False
) -> Field:
    """A list field; the checker returns the checked items and raises ProtocolError otherwise.

    Args:
        inner: the checker for each item (its path is ``path[i]``).
        max_items, min_items: bounds on the number of items, inclusive.
        unique: refuse two equal items.
        sorted_: require ascending order (text compared by its UTF-8 bytes).
    """

    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            _fail(f"{path}: expected a list")
        if not min_items <= len(value) <= max_items:
            _fail(f"{path}: {len(value)} items outside {min_items}..{max_items}")
        items = [inner(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if unique and len(set(map(_hashable, items))) != len(items):
            _fail(f"{path}: duplicate items")
        if sorted_ and items != sorted(items, key=_sort_key):
            _fail(f"{path}: items not in canonical order")
        return items

    return check


def _hashable(item: Any) -> Any:
    if isinstance(item, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in item.items()))
    if isinstance(item, list):
        return tuple(_hashable(v) for v in item)
    return item


def _sort_key(item: Any) -> Any:
    return item.encode("utf-8") if isinstance(item, str) else item
