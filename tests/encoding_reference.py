"""The canonical msgpack codec as it was on msgpack-python, kept as the reference.

:mod:`tisa.encoding` now runs on msgspec; ``tests/test_encoding_differential.py`` proves
that it accepts exactly what this code accepts, decodes it to equal values, and packs
the same bytes. This is the code of ``tisa/encoding.py`` before the change (its codec
part, unchanged but for the schema checkers left out); nothing outside tests uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import msgpack

from tisa.errors import ProtocolError

__all__ = ["MAX_DEPTH", "pack", "pack_checked", "unpack"]

# Depth of nested containers accepted; our schemas need 4, more is an attack on the
# recursion of the decoder and of our validators.
MAX_DEPTH = 8


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
