"""The files a deployment keeps: exported identities, arrangement files, key files.

These are the formats the ``tisa`` command reads and writes, as library functions so
that scripts (and the demo) use them without going through the command line:

* an exported identity is JSON ``{"format": "tisa-identity/1", "name", "sign", "box",
  "fingerprint"}`` with base64 keys; the fingerprint is checked on reading;
* an arrangement file is the canonical encoding of a :class:`SignedArrangement`, with
  whatever signatures it has gathered so far;
* a member's home folder holds ``identity.key``, ``arrangement.tisa`` and ``store/``;
  :func:`load_home` opens one (the key with its passphrase, the arrangement, which must be
  effective and name the key's holder) for a script, a relay or a member node.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.pwhash

from tisa.arrangement import (
    MAX_ARRANGEMENT_SIZE,
    Arrangement,
    Member,
    Role,
    SignedArrangement,
    check_name,
)
from tisa.errors import ProtocolError, Reason, Refused, TisaError, UsageError, VerificationError
from tisa.keys import KEY_SIZE, EncryptionPublicKey, MemberSecret, PublicIdentity, SigningPublicKey

__all__ = [
    "ARRANGEMENT_FILE",
    "IDENTITY_FILE",
    "IDENTITY_FORMAT",
    "PASSPHRASE_ENV",
    "STORE_DIR",
    "FileFormatError",
    "Home",
    "arrangement_summary",
    "atomic_text",
    "create_identity",
    "default_home",
    "draft_arrangement",
    "identity_from_json",
    "identity_to_json",
    "load_home",
    "resolve_passphrase",
    "merge_arrangements",
    "read_arrangement",
    "read_identity",
    "sign_arrangement",
    "write_arrangement",
]

IDENTITY_FILE = "identity.key"
ARRANGEMENT_FILE = "arrangement.tisa"
STORE_DIR = "store"
IDENTITY_FORMAT = "tisa-identity/1"
# Exported identity files are a few hundred bytes; refuse to parse anything much larger.
MAX_IDENTITY_FILE = 16 * 1024


# A key file's passphrase is read from this variable when no other is named.
PASSPHRASE_ENV = "TISA_PASSPHRASE"


def resolve_passphrase(env: str | None, ask: Callable[[], str] | None) -> str:
    """A key file's passphrase: from ``$env`` if a variable is named, else from
    ``$TISA_PASSPHRASE``, else from ``ask()`` (a prompt; None where nobody can be asked).

    The one rule of the ``tisa`` command and the relay's command.

    Raises:
        UsageError: ``env`` names an unset or empty variable, the answer is empty, or there
            is no source at all (the message says how to give one).
    """
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise UsageError(f"environment variable {env} is not set or empty")
        return value
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value
    if ask is None:
        raise UsageError(
            f"no passphrase: set ${PASSPHRASE_ENV}, or give --passphrase-env VAR, "
            "or run on a terminal to be asked"
        )
    answer = ask()
    if not answer:
        raise UsageError("empty passphrase")
    return answer


class FileFormatError(UsageError):
    """A file is not what it should be: not an exported identity, not an arrangement,
    a fingerprint that does not match, a file that would be overwritten."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise FileFormatError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise FileFormatError(f"{what} is not valid base64") from None


def identity_to_json(name: str, identity: PublicIdentity) -> dict[str, str]:
    """The exported form of a public identity (what ``tisa identity export`` writes).

    Args:
        name: the member name the identity is meant for.
        identity: the public keys.

    Returns:
        A JSON-ready dict: format tag, name, both public keys (base64) and the fingerprint
        people compare by voice or on paper before they sign an arrangement listing it.
    """
    return {
        "format": IDENTITY_FORMAT,
        "name": name,
        "sign": _b64(identity.signing.raw),
        "box": _b64(identity.encryption.raw),
        "fingerprint": identity.fingerprint,
    }


def identity_from_json(value: Any) -> tuple[str, PublicIdentity]:
    """Parse an exported identity; the fingerprint, if given, must match the keys.

    Returns:
        (name, identity)

    Raises:
        FileFormatError: not an exported identity, or its fingerprint does not match.
        UsageError: a key is not a valid public key.
    """
    if not isinstance(value, dict) or value.get("format") != IDENTITY_FORMAT:
        raise FileFormatError(f"not an exported identity (format {IDENTITY_FORMAT!r})")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise FileFormatError("exported identity has no name")
    sign = _unb64(value.get("sign"), "sign key")
    box = _unb64(value.get("box"), "box key")
    if len(sign) != KEY_SIZE or len(box) != KEY_SIZE:
        raise FileFormatError("exported identity keys must be 32 bytes each")
    identity = PublicIdentity(SigningPublicKey(sign), EncryptionPublicKey(box))
    fingerprint = value.get("fingerprint")
    if fingerprint is not None and fingerprint != identity.fingerprint:
        raise FileFormatError(f"fingerprint of {name!r} does not match its keys")
    return name, identity


def read_identity(path: Path) -> tuple[str, PublicIdentity]:
    """Read an exported identity file. Raises FileFormatError, UsageError, OSError."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_IDENTITY_FILE + 1)
    if len(data) > MAX_IDENTITY_FILE:
        raise FileFormatError(f"{path}: too large for an exported identity")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FileFormatError(f"{path}: not JSON") from None
    try:
        return identity_from_json(value)
    except FileFormatError as exc:
        raise FileFormatError(f"{path}: {exc}") from None


def create_identity(
    path: Path, name: str, passphrase: str, *, insecure_fast_kdf: bool = False
) -> MemberSecret:
    """Generate a member's keys and save them to ``path`` (mode 0600, never overwritten).

    Args:
        path: the key file to create.
        name: the member name, stored in the key file.
        passphrase: protects the file (argon2id).
        insecure_fast_kdf: use libsodium's minimum argon2id cost. For demos and tests
            only: it makes a stolen key file cheap to attack.
    """
    # Validates the name as the arrangement would, before any key is written.
    check_name(name, "member name")
    secret = MemberSecret.generate()
    kwargs: dict[str, Any] = {"name": name}
    if insecure_fast_kdf:
        kwargs["opslimit"] = nacl.pwhash.argon2id.OPSLIMIT_MIN
        kwargs["memlimit"] = nacl.pwhash.argon2id.MEMLIMIT_MIN
    path.parent.mkdir(parents=True, exist_ok=True)
    secret.save(path, passphrase, **kwargs)
    return secret


def default_home() -> Path:
    """The home folder used without --home or $TISA_HOME: the platform's folder for a
    user's application data (``~/.local/share/tisa`` on Linux, honouring
    ``$XDG_DATA_HOME``; ``~/Library/Application Support/tisa`` on macOS;
    ``%LOCALAPPDATA%\\tisa`` on Windows)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("tisa", appauthor=False))


def read_arrangement(path: Path) -> SignedArrangement:
    """Read an arrangement file; every signature present is checked.

    Raises:
        FileFormatError: not an arrangement file, or a signature does not verify (the
            message names the file and whose signature).
        Refused: as :meth:`SignedArrangement.decode`.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        data = handle.read(MAX_ARRANGEMENT_SIZE + 1)
    try:
        return SignedArrangement.decode(data)
    except ProtocolError as exc:
        raise FileFormatError(f"{path}: not an arrangement file ({exc.detail})") from None
    except VerificationError:
        # A local file, not input from a peer: saying whose signature failed tells an
        # attacker nothing and tells the member what to fix.
        names = _bad_signatures(data)
        whose = f"the signature of {', '.join(names)}" if names else "a signature"
        raise FileFormatError(
            f"{path}: {whose} does not verify (the file was changed after signing, or "
            "the signature is not theirs): ask them to sign again"
        ) from None


def _bad_signatures(data: bytes) -> list[str]:
    """The members whose signature in an arrangement file's bytes does not verify."""
    from tisa import encoding as enc

    try:
        outer = enc.unpack(data, max_size=MAX_ARRANGEMENT_SIZE)
        arrangement = Arrangement.decode(outer["arrangement"])
        signatures = dict(outer["signatures"])
    except (TisaError, KeyError, TypeError, ValueError):
        return []
    bad = []
    for name, signature in sorted(signatures.items()):
        try:
            SignedArrangement(arrangement, {name: signature})
        except (TisaError, TypeError):
            bad.append(str(name))
    return bad


@dataclass(frozen=True)
class Home:
    """A member's (or the relay's) home folder, opened: what a node needs to run.

    Attributes:
        path: the folder.
        secret: the secret keys from ``identity.key``.
        name: the member whose keys ``secret`` holds (the key file's name, if it has one).
        arrangement: the effective arrangement from ``arrangement.tisa``.
    """

    path: Path
    secret: MemberSecret
    name: str
    arrangement: Arrangement

    @property
    def store(self) -> Path:
        """The node's durable state: ``path / "store"``."""
        return self.path / STORE_DIR


def load_home(
    path: str | os.PathLike[str],
    passphrase: str,
    *,
    key: str | os.PathLike[str] | None = None,
    arrangement: str | os.PathLike[str] | None = None,
) -> Home:
    """Open the home folder that ``tisa identity create`` and ``tisa arrangement sign`` fill.

    Usage::

        home = load_home("seoul", os.environ["TISA_PASSPHRASE"])
        async with open_node(home.secret, home.name, home.arrangement, relay, home.store):
            ...

    Args:
        path: the folder.
        passphrase: the key file's passphrase.
        key, arrangement: other files to read instead of ``path / "identity.key"`` and
            ``path / "arrangement.tisa"``.

    Raises:
        OSError: a file cannot be read. FileFormatError: not an arrangement file, a key
        that is no member's, or a key file saved under another member's name.
        KeyFileError: a wrong passphrase or a damaged key file. ArrangementNotEffective:
        a member has not signed yet. VerificationError: a signature on the arrangement
        does not verify.
    """
    folder = Path(path)
    signed = read_arrangement(Path(arrangement) if arrangement else folder / ARRANGEMENT_FILE)
    effective = signed.require_effective()
    key_path = Path(key) if key else folder / IDENTITY_FILE
    secret, name = MemberSecret.load(key_path, passphrase)
    # The member is found by its keys; a key file saved under a name must agree.
    member = next((m for m in effective.members if m.identity == secret.public), None)
    if member is None:
        raise FileFormatError(f"{key_path}: not the key of any member of the arrangement")
    if name and name != member.name:
        raise FileFormatError(
            f"{key_path}: saved as {name!r}, but it is the key of member {member.name!r}"
        )
    return Home(folder, secret, member.name, effective)


def write_arrangement(path: Path, signed: SignedArrangement, *, overwrite: bool = True) -> None:
    """Write an arrangement file atomically (temporary file, fsync, rename)."""
    if not overwrite and path.exists():
        raise FileFormatError(f"{path} exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(signed.encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def draft_arrangement(
    *,
    name: str,
    members: Sequence[tuple[str, PublicIdentity, Sequence[str]]],
    scopes: Sequence[str],
    levels: Sequence[str],
    relay: str | None = None,
    created: int | None = None,
    previous: SignedArrangement | None = None,
) -> SignedArrangement:
    """An unsigned arrangement, version 1 or an amendment of ``previous``.

    Args:
        name: the arrangement's name.
        members: (name, identity, role names) for each member.
        scopes, levels: what may be shared; levels lowest first.
        relay: the relay's name; by default the one member holding the relay role.
        created: unix time; now by default.
        previous: the version this one amends (its members, scopes, levels are replaced).

    Raises:
        UsageError: the arrangement is not valid (see :class:`Arrangement`).
    """
    built = []
    for member_name, identity, role_names in members:
        try:
            roles = frozenset(Role(r) for r in role_names)
        except ValueError:
            raise UsageError(
                f"member {member_name!r}: roles are {', '.join(r.value for r in Role)}"
            ) from None
        built.append(Member(name=member_name, identity=identity, roles=roles))
    if relay is None:
        relays = [m.name for m in built if Role.RELAY in m.roles]
        relay = relays[0] if len(relays) == 1 else ""
        if not relay:
            raise UsageError("exactly one member must hold the relay role")
    fields: dict[str, Any] = {
        "name": name,
        "members": tuple(built),
        "relay": relay,
        "scopes": tuple(scopes),
        "levels": tuple(levels),
        "created": int(time.time()) if created is None else created,
    }
    if previous is None:
        return SignedArrangement(Arrangement(version=1, **fields))
    return SignedArrangement(previous.arrangement.amend(**fields))


def sign_arrangement(
    signed: SignedArrangement, secret: MemberSecret, name: str | None = None
) -> tuple[SignedArrangement, str]:
    """Add the signature of the member whose key ``secret`` is.

    Args:
        signed: the arrangement with the signatures so far.
        secret: the signer's keys.
        name: the member name; found from the key when not given.

    Returns:
        (the arrangement with the signature added, the signer's name)

    Raises:
        Refused(NOT_A_MEMBER): the key is not listed in the arrangement.
        UsageError: ``name`` is listed with another key.
    """
    if name is None:
        member = signed.arrangement.member_by_signing_key(secret.public.signing.raw)
        if member is None:
            raise Refused(Reason.NOT_A_MEMBER, "this key is not listed in the arrangement")
        name = member.name
    return signed.signed_by(secret, name), name


def merge_arrangements(copies: Sequence[SignedArrangement]) -> SignedArrangement:
    """Gather the signatures of several copies of one arrangement (signed separately).

    Raises:
        FileFormatError: the copies are of different arrangements (or versions).
    """
    if not copies:
        raise FileFormatError("nothing to merge")
    first = copies[0]
    signatures: dict[str, bytes] = {}
    for copy in copies:
        if copy.arrangement.id != first.arrangement.id:
            raise FileFormatError("these files hold different arrangements; cannot merge")
        signatures.update(copy.signatures)
    return SignedArrangement(first.arrangement, signatures)


def arrangement_summary(signed: SignedArrangement) -> dict[str, Any]:
    """A JSON-ready description: members, roles, fingerprints, who signed, effective."""
    arrangement = signed.arrangement
    return {
        "name": arrangement.name,
        "version": arrangement.version,
        "id": arrangement.id.hex(),
        "previous": arrangement.previous.hex() if arrangement.previous else None,
        "created": arrangement.created,
        "relay": arrangement.relay,
        "scopes": list(arrangement.scopes),
        "levels": list(arrangement.levels),
        "members": [
            {
                "name": m.name,
                "roles": sorted(r.value for r in m.roles),
                "fingerprint": m.identity.fingerprint,
                "signed": m.name in signed.signatures,
            }
            for m in arrangement.members
        ],
        "signed_by": sorted(signed.signatures),
        "missing": signed.missing,
        "effective": signed.is_effective,
    }


@contextlib.contextmanager
def atomic_text(path: Path) -> Iterator[Any]:
    """Write a text file through a temporary file, fsynced and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
