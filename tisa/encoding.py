"""Canonical msgpack and strict schemas.

Every value the toolkit signs or sends is a msgpack map with string keys. The canonical
encoding is the one :func:`pack` produces: keys sorted by their UTF-8 bytes, the shortest
form for every integer and length, ``bin`` for bytes, ``str`` for text, no floats, no
extension types. :func:`unpack` accepts exactly the canonical encoding: it refuses
duplicate keys, non-string keys, extension types, floats, trailing bytes and any input
that does not re-encode to the same bytes.

The codec underneath is msgspec's (in C): :func:`unpack` decodes with it, checks the
types and the depth in one walk and re-encodes with keys sorted to compare; :func:`pack`
checks the value in one walk and encodes it with keys sorted. Acceptance, values and bytes
are those of the msgpack-python codec it replaced, which ``tests/encoding_reference.py``
keeps and ``tests/test_encoding_differential.py`` compares with this one.

The objects on a report's path (release tokens, report headers, prekeys) are also
decoded the typed way (:func:`typed_decoder`): one msgspec call decodes the canonical
encoding straight into a ``msgspec.Struct`` that mirrors the schema, types, sizes and
ranges included, and the few checks msgspec cannot express (text, cross-field rules)
follow in Python; anything that path does not accept is handed to :func:`unpack` and
:func:`check_map`, which accept it the same or raise the precise error. The builders
check plain values (:func:`is_plain`) the same way, by decoding their encoding. Tests
(``tests/test_typed_decoding.py``) feed both paths valid, mutated and malformed input.

Every failure raises :class:`~tisa.errors.ProtocolError`, never a msgspec exception.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime
from itertools import pairwise
from typing import Any, NoReturn, TypeVar

import msgspec

from tisa.errors import ProtocolError

__all__ = [
    "Field",
    "check_map",
    "are_texts",
    "is_plain",
    "is_text",
    "pack",
    "pack_checked",
    "slot_builder",
    "typed_decoder",
    "unpack",
]

# Depth of nested containers accepted; our schemas need 4, more is an attack on the
# recursion of the decoder and of our validators.
MAX_DEPTH = 8


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _fail(detail: str) -> NoReturn:
    raise ProtocolError(detail)


def _plain_value(value: Any) -> Any:
    # msgspec calls this for a type it does not encode itself. Only pack_checked can meet
    # one (pack makes every value plain first): a str or int subclass that is not an enum
    # (msgspec encodes enums as their value) encodes as its plain value, as msgpack's
    # packer did.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__index__(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


# msgspec decodes a map into a dict that keeps the keys in the order they came and the
# last value of a duplicated key; encoding with order="sorted" writes every map's keys
# sorted by code point (the order of their UTF-8 bytes), every integer and length in its
# shortest form, bytes as bin, text as str, a tuple as an array, an enum as its value.
_decode = msgspec.msgpack.Decoder().decode
_encode_sorted = msgspec.msgpack.Encoder(order="sorted", enc_hook=_plain_value).encode

# The types that encode as they are (None is handled with them: type(None)).
_PLAIN = frozenset({bytes, str, int, bool, type(None)})


def is_plain(value: Any) -> bool:
    """Whether ``value`` is a dict or list made only of dicts with str keys, lists,
    tuples and values of exactly the types bytes, str, int, bool and None, within the
    depth limit: msgspec then encodes it canonically as it is, and decoding the encoding
    gives it back (a tuple as a list). A builder that checks such a value by decoding
    its encoding with a typed decoder (:func:`typed_decoder`) checks the value itself."""
    # Exact type checks: cheaper than isinstance with ABCs on this hot path, and the
    # protocol only ever builds plain dicts, lists and tuples. False sends pack's value
    # to _canonical, which makes it plain or refuses it with the reason.
    kind = type(value)
    if kind is not dict and kind is not list and kind is not tuple:
        return False
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        container, depth = stack.pop()
        if depth >= MAX_DEPTH:
            return False
        if type(container) is dict:
            for key in container:
                if type(key) is not str:
                    return False
            container = container.values()
        for item in container:
            kind = type(item)
            if kind is dict or kind is list or kind is tuple:
                stack.append((item, depth + 1))
            elif kind not in _PLAIN:
                return False
    return True


def _canonical(value: Any, depth: int = 0) -> Any:
    # The slow path of pack, for a value is_plain did not take: a Mapping that is not a
    # dict becomes a dict, a str or int subclass its plain value; anything else the
    # protocol does not carry (float, set, bytearray, a non-str key, too deep) is refused
    # here. Text that is not valid Unicode (a lone surrogate) and integers out of
    # msgpack's range are left to the encoder, which refuses exactly those.
    kind = type(value)
    if kind is bytes or kind is str or kind is int or kind is bool or value is None:
        return value
    if depth >= MAX_DEPTH:
        _fail("nesting too deep")
    if kind is dict:
        for key in value:
            if type(key) is not str:
                _fail("map key is not a string")
        # In sorted order, so that of two refused values the first in the encoding is named.
        return {key: _canonical(value[key], depth + 1) for key in sorted(value)}
    if kind is list or kind is tuple:
        return [_canonical(item, depth + 1) for item in value]
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
    plain = value if is_plain(value) else _canonical(value)
    try:
        return _encode_sorted(plain)
    except (UnicodeEncodeError, OverflowError):
        # Named as the reference packer names it: the first fault in encoding order
        # (msgspec may meet a later key's fault first while it sorts the keys).
        _fail(_first_unencodable(plain) or "cannot encode the value")


def _first_unencodable(value: Any) -> str:
    # Only on the way to a refusal: the first text that is not valid Unicode (a lone
    # surrogate: Python holds it, UTF-8 cannot) or integer outside -2**63 .. 2**64 - 1,
    # in the order the encoding writes them (each map's keys sorted, a key before its
    # value). ``value`` is plain (pack made it so), so the recursion is bounded by
    # MAX_DEPTH.
    kind = type(value)
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "text is not valid Unicode"
    elif kind is int and not -(2**63) <= value < 2**64:
        return "integer out of range"
    elif kind is dict:
        for key in sorted(value):
            for part in (key, value[key]):
                reason = _first_unencodable(part)
                if reason:
                    return reason
    elif kind is list or kind is tuple:
        for item in value:
            reason = _first_unencodable(item)
            if reason:
                return reason
    return ""


def pack_checked(value: dict[str, Any]) -> bytes:
    """Encode a map whose values a schema has already checked (:func:`check_map`).

    The same bytes as :func:`pack` for such a map, without its walk over every value
    (the type checks it would repeat are the schema's): the encoder sorts every map's
    keys and encodes the rest. Only for values made of bytes, str, int (not bool where
    the schema refuses it), None, lists and maps of them, as the schemas allow; a float
    or another type the protocol does not carry is not refused here. Tests compare it
    with :func:`pack`.
    """
    return _encode_sorted(value)


_SCALARS = frozenset({bytes, str, int, bool, type(None)})
_EXTENSIONS = frozenset({msgspec.msgpack.Ext, datetime})


def _check_tree(value: dict[str, Any]) -> None:
    # A float64, an extension and a timestamp (ext -1, which msgspec decodes to a
    # datetime) all re-encode to the bytes they came from, and msgspec bounds nesting
    # only by Python's recursion limit; so one walk, without recursion, checks types and
    # depth. Keys are checked by the re-encoding (msgspec sorts only str keys).
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
                if kind in _EXTENSIONS:
                    _fail("extension types are not allowed")
                _fail(f"{'floats are' if kind is float else 'this type is'} not allowed")


def _why_not_canonical(value: dict[str, Any]) -> str:
    # Only on the way to a refusal: name the first map whose keys came out of order.
    # A duplicated key that keeps the order, and a longer form than needed, cannot be
    # told apart from the decoded value: both just re-encode shorter.
    stack: list[Any] = [value]
    while stack:
        container = stack.pop()
        if type(container) is dict:
            keys = list(container)
            if any(a >= b for a, b in pairwise(keys)):
                return "map keys not in canonical order (or duplicated)"
            stack.extend(container.values())
        elif type(container) is list:
            stack.extend(container)
    return "not canonical (a duplicate key, or a longer form than the shortest)"


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
        value = _decode(data)
    except RecursionError:  # msgspec's own nesting bound is Python's recursion limit
        _fail("nesting too deep")
    except Exception as exc:  # DecodeError, ValidationError (a malformed timestamp)
        raise ProtocolError(f"not msgpack: {exc}") from None
    if type(value) is not dict:
        _fail("top level is not a map")
    _check_tree(value)
    # Re-encoding with keys sorted gives the canonical bytes of the decoded value; any
    # other form of it (keys out of order, a duplicated key, a long int or length
    # encoding, str for bin) differs here. A key that is not text (an int, bytes, nil,
    # bool or array key decodes) makes the sorted encoding refuse.
    try:
        canonical = _encode_sorted(value)
    except TypeError:
        _fail("map key is not a string")
    if canonical != data:
        _fail(_why_not_canonical(value))
    return value


# --- typed decoding (the fast path of a schema) ---------------------------------------

_Typed = TypeVar("_Typed", bound=msgspec.Struct)


def typed_decoder(kind: type[_Typed]) -> Callable[[bytes], _Typed | None]:
    """A decoder of ``kind``'s canonical encoding straight into a typed value, or None.

    ``kind`` is a ``msgspec.Struct`` whose fields mirror a schema (:func:`check_map`):
    each field typed and bounded with ``msgspec.Meta`` as the schema's checker bounds it
    (``forbid_unknown_fields``; an optional key absent from the map is a field with a
    default of None and ``omit_defaults``). The returned function decodes ``data`` in one
    C call (types, lengths, ranges and the set of keys checked by msgspec) and returns
    the value only when it re-encodes (keys sorted) to exactly ``data``, which is the
    canonical check of :func:`unpack`: a duplicated key, keys out of order, a longer form
    than the shortest, or a nil standing for an absent key all differ there.

    It never raises and never accepts what the schema refuses, as long as ``kind`` is
    at least as strict as the schema; what msgspec cannot express (the UTF-8 length and
    control characters of text, :func:`is_text`; cross-field rules) is the caller's to
    check next. None means "not decided here": the caller then runs the schema
    (:func:`unpack` and :func:`check_map`), which accepts or names the fault exactly as
    before. The tests compare the two paths on valid and on mutated encodings.
    """
    decode = msgspec.msgpack.Decoder(kind).decode

    def attempt(data: bytes) -> _Typed | None:
        try:
            value = decode(data)
        except Exception:  # DecodeError, ValidationError, RecursionError: the schema names it
            return None
        return value if _encode_sorted(value) == data else None

    return attempt


def is_text(value: str, max_bytes: int) -> bool:
    """Whether :func:`text` with ``max_bytes`` (not empty) accepts ``value``, a ``str``."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return 0 < size <= max_bytes and _CONTROL.search(value) is None


def are_texts(values: list[str], max_bytes: int) -> bool:
    """Whether :func:`is_text` holds for every ``str`` of ``values``.

    For ASCII text no longer than ``max_bytes`` in all (the names of a token or header)
    in three C calls: one byte a character, and an ASCII string is printable exactly
    when it holds no control character (U+0000 to U+001F, U+007F). Anything else is
    checked value by value.
    """
    joined = "".join(values)
    if joined.isascii() and len(joined) <= max_bytes:
        return joined.isprintable() and "" not in values
    return all(is_text(value, max_bytes) for value in values)


_Built = TypeVar("_Built")


def slot_builder(cls: type[_Built], names: tuple[str, ...]) -> Callable[..., _Built]:
    """A constructor of the frozen, slotted dataclass ``cls`` that sets its slots
    ``names`` (every one it has, in this order) from positional values, without the
    generated ``__init__`` (keyword arguments and ``object.__setattr__`` per field).

    Only for values already checked (a typed decoding) and classes with no
    ``__post_init__``: it is the same object ``__init__`` would make, in half the time.
    """
    if set(names) != set(cls.__slots__) or len(names) != len(cls.__slots__):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}: the names are not its slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__")
    # One positional parameter and one slot-descriptor call per field, unrolled (as
    # dataclasses writes __init__): a loop over the setters costs as much as it saves.
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    scope.update({f"set{i}": getattr(cls, name).__set__ for i, name in enumerate(names)})
    params = ", ".join(f"v{i}" for i in range(len(names)))
    lines = "".join(f"    set{i}(built, v{i})\n" for i in range(len(names)))
    exec(f"def build({params}):\n    built = new(cls)\n{lines}    return built\n", scope)
    build: Callable[..., _Built] = scope["build"]
    return build


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
        try:
            # The item's path is only needed in an error message: no string is built
            # per item on this hot path (a token list, every report); on a failure the
            # items are checked again, each with its path, which raises the same error
            # naming the item (the checkers are pure).
            items = [inner(item, path) for item in value]
        except ProtocolError:
            for i, item in enumerate(value):
                inner(item, f"{path}[{i}]")
            raise
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
