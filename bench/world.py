"""The benchmarks' arrangement: Seoul and Tokyo (originators and recipients), Washington
the relay, one scope and one level, as in the demo."""

from __future__ import annotations

from tisa.arrangement import Arrangement, Member, Role
from tisa.keys import MemberSecret
from tisa.prekeys import PrekeyKind, PrekeySecret

__all__ = ["LEVEL", "SCOPE", "bench_arrangement", "bench_prekey"]

SCOPE = "nk.missile"
LEVEL = "secret"


def bench_arrangement(secrets: dict[str, MemberSecret], *, created: int) -> Arrangement:
    """The arrangement of ``secrets["seoul"]``, ``["tokyo"]`` and ``["washington"]``."""
    both = frozenset({Role.ORIGINATOR, Role.RECIPIENT})
    return Arrangement(
        name="bench",
        version=1,
        members=(
            Member(name="seoul", identity=secrets["seoul"].public, roles=both),
            Member(name="tokyo", identity=secrets["tokyo"].public, roles=both),
            Member(
                name="washington",
                identity=secrets["washington"].public,
                roles=frozenset({Role.RELAY}),
            ),
        ),
        relay="washington",
        scopes=(SCOPE,),
        levels=(LEVEL,),
        created=created,
    )


def bench_prekey(
    secret: MemberSecret,
    name: str,
    arrangement: Arrangement,
    *,
    now: int,
    kind: PrekeyKind = PrekeyKind.SIGNED,
) -> tuple[bytes, PrekeySecret]:
    """A prekey of ``name``'s, valid for a day around ``now``: (encoded, secret). The
    benchmarks that measure something else than the prekey fetch make it themselves."""
    prekey = PrekeySecret.generate(kind, created=now - 60, not_after=now + 86400)
    return prekey.publish(secret, name, arrangement), prekey
