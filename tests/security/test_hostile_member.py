"""A hostile member (or relay) with the core alone: every attack of tisa_testing.hostile
is refused with the right typed error or reason code."""

from __future__ import annotations

from typing import Any

import pytest

from tisa import encoding as enc
from tisa.arrangement import Arrangement, SignedArrangement
from tisa.audit import Checkpoint
from tisa.errors import (
    ArrangementNotEffective,
    ProtocolError,
    Reason,
    Refused,
    UsageError,
    VerificationError,
)
from tisa.handshake import MemberHandshake, RelayHandshake
from tisa.keys import Context, MemberSecret, PublicIdentity
from tisa.prekeys import unwrap_content_key
from tisa.receipt import Receipt, StoredAck
from tisa.report import open_report
from tisa.token import ReleaseToken, check_for_recipient, check_for_relay
from tisa_testing import hostile
from tisa_testing.world import World

# --- surreptitious forwarding --------------------------------------------------------------


def _tokyo_holds(world: World) -> tuple[Any, Any]:
    """Seoul's report to Tokyo, opened by Tokyo: (sealed report, Tokyo's release)."""
    report = world.seal(b"launch site coordinates 40.85N 129.66E")
    release = world.check(world.token(report), "tokyo")
    open_report(report.ciphertext, release.opener(world.arrangement))
    return report, release


def test_reseal_claiming_the_originator_fails_the_token_signature(world: World) -> None:
    report, release = _tokyo_holds(world)
    forged = hostile.reseal_to_third_party(
        report.ciphertext,
        release,
        world.secrets["tokyo"],
        world.arrangement,
        to="canberra",
        claim_originator="seoul",
        now=world.now,
        signed_prekey=world.signed_prekey_key("canberra"),
    )
    with pytest.raises(VerificationError):
        world.check(forged.token, "canberra")


def test_reseal_as_oneself_fails_on_the_inner_signature(world: World) -> None:
    # Tokyo signs the token honestly as itself; the inner header still says Seoul.
    report, release = _tokyo_holds(world)
    forged = hostile.reseal_to_third_party(
        report.ciphertext,
        release,
        world.secrets["tokyo"],
        world.arrangement,
        to="canberra",
        claim_originator="tokyo",
        now=world.now,
        signed_prekey=world.signed_prekey_key("canberra"),
    )
    canberra = world.check(forged.token, "canberra")  # a valid token from Tokyo
    with pytest.raises(VerificationError):
        open_report(forged.ciphertext, canberra.opener(world.arrangement))


def test_reseal_with_header_rewritten_to_list_the_third_party(world: World) -> None:
    report, release = _tokyo_holds(world)

    def add_canberra(header: dict[str, Any]) -> None:
        header["recipients"] = ["canberra", "tokyo"]
        header["originator"] = "tokyo"

    forged = hostile.reseal_to_third_party(
        report.ciphertext,
        release,
        world.secrets["tokyo"],
        world.arrangement,
        to="canberra",
        claim_originator="tokyo",
        now=world.now,
        signed_prekey=world.signed_prekey_key("canberra"),
        edit_header=add_canberra,
    )
    canberra = world.check(forged.token, "canberra")
    # The header now agrees with the token, but Seoul's signature does not cover it and
    # Tokyo's key is not the one it is checked with.
    with pytest.raises(VerificationError):
        open_report(forged.ciphertext, canberra.opener(world.arrangement))


def test_original_token_forwarded_to_a_third_party_is_not_theirs(world: World) -> None:
    report = world.seal()
    token = world.token(report)
    with pytest.raises(Refused) as caught:
        world.check(token, "canberra")
    assert caught.value.reason is Reason.WRONG_RECIPIENT


# --- strip and re-sign ---------------------------------------------------------------------


def test_rerelease_of_anothers_ciphertext_as_oneself(world: World) -> None:
    report, release = _tokyo_holds(world)
    token = hostile.rerelease_as_self(
        release,
        world.secrets["tokyo"],
        "tokyo",
        world.arrangement,
        to="canberra",
        now=world.now,
        signed_prekey=world.signed_prekey_key("canberra"),
    )
    # The relay holds Seoul's submission: a token by Tokyo does not release it.
    with pytest.raises(Refused) as caught:
        check_for_relay(
            token,
            world.arrangement,
            report_id=report.report_id,
            digest=report.digest,
            size=report.size,
            originator="seoul",
            now=world.now,
        )
    assert caught.value.reason is Reason.WRONG_ORIGINATOR
    # Delivered anyway (Tokyo submitted the bytes as its own): the inner header is Seoul's.
    canberra = world.check(token, "canberra")
    with pytest.raises(VerificationError):
        open_report(report.ciphertext, canberra.opener(world.arrangement))


def test_token_stripped_and_resigned_keeps_failing(world: World) -> None:
    report = world.seal()
    token = world.token(report)
    resigned = hostile.resign_envelope(token, world.secrets["tokyo"], Context.TOKEN)
    with pytest.raises(VerificationError):
        world.check(resigned, "tokyo")


def test_token_resigned_by_the_relay_is_refused(world: World) -> None:
    report = world.seal()
    token = world.token(report)
    for edit in (None, lambda body: body.update(recipient="canberra")):
        forged = hostile.resign_envelope(
            token, world.secrets["washington"], Context.TOKEN, edit=edit
        )
        with pytest.raises(VerificationError):
            world.check(forged, "tokyo")


def test_token_naming_the_relay_as_originator_is_refused(world: World) -> None:
    report = world.seal()
    token = hostile.resign_envelope(
        world.token(report),
        world.secrets["washington"],
        Context.TOKEN,
        edit=lambda body: body.update(originator="washington"),
    )
    with pytest.raises(VerificationError):
        world.check(token, "tokyo")


def test_receipt_stripped_and_resigned_by_another_member(world: World) -> None:
    report = world.seal()
    receipt = Receipt.issue(
        world.secrets["tokyo"],
        world.arrangement,
        report=report.report_id,
        token=bytes(16),
        originator="seoul",
        recipient="tokyo",
        digest=report.digest,
        received=world.now,
    )
    for signer in ("seoul", "canberra", "washington"):
        forged = hostile.resign_envelope(receipt.encoded, world.secrets[signer], Context.RECEIPT)
        with pytest.raises(VerificationError):
            Receipt.verify(forged, world.arrangement)


def test_ack_and_checkpoint_signed_by_a_member_are_refused(world: World) -> None:
    ack = StoredAck.issue(
        world.secrets["washington"],
        world.arrangement,
        report=bytes(16),
        originator="seoul",
        digest=bytes(32),
        size=2000,
        stored=world.now,
    )
    checkpoint = Checkpoint.issue(
        world.secrets["washington"], world.arrangement, seq=0, head=bytes(32), time=world.now
    )
    forged_ack = hostile.resign_envelope(ack.encoded, world.secrets["seoul"], Context.ACK)
    forged_cp = hostile.resign_envelope(checkpoint.encoded, world.secrets["seoul"], Context.AUDIT)
    with pytest.raises(VerificationError):
        StoredAck.verify(forged_ack, world.arrangement)
    with pytest.raises(VerificationError):
        Checkpoint.verify(forged_cp, world.arrangement)


# --- key substitution ----------------------------------------------------------------------


def test_arrangement_with_a_swapped_key_keeps_no_signature(world: World) -> None:
    attacker = MemberSecret.generate()
    for keys in (
        {"signing": attacker.public.signing},
        {"encryption": attacker.public.encryption},
        {"signing": attacker.public.signing, "encryption": attacker.public.encryption},
    ):
        swapped = hostile.substitute_key(world.arrangement, "tokyo", **keys)
        assert swapped.id != world.arrangement.id
        with pytest.raises(VerificationError):
            SignedArrangement.decode(hostile.transplant_signatures(world.signed, swapped))
        # Signed only by the relay that substituted it: not effective, naming the rest.
        relay_only = SignedArrangement(swapped).signed_by(world.secrets["washington"], "washington")
        with pytest.raises(ArrangementNotEffective) as caught:
            SignedArrangement.load_effective(relay_only.encode())
        assert set(caught.value.missing) == {"canberra", "seoul", "tokyo"}
        assert caught.value.reason is Reason.ARRANGEMENT_NOT_EFFECTIVE


def test_substituted_amendment_needs_every_signature(world: World) -> None:
    attacker = MemberSecret.generate()
    swapped = hostile.substitute_key(
        world.arrangement, "tokyo", encryption=attacker.public.encryption
    )
    amended = world.arrangement.amend(members=swapped.members)
    partly = SignedArrangement(amended)
    for name in ("washington", "seoul", "canberra"):
        partly = partly.signed_by(world.secrets[name], name)
    with pytest.raises(ArrangementNotEffective) as caught:
        SignedArrangement.load_effective(partly.encode())
    assert caught.value.missing == ["tokyo"]


def test_token_under_a_substituted_arrangement_is_refused(world: World) -> None:
    # Seoul was tricked into sealing Tokyo's key to the attacker's box key; the token it
    # signs names the substituted arrangement's id, which Tokyo does not hold.
    attacker = MemberSecret.generate()
    swapped = hostile.substitute_key(
        world.arrangement, "tokyo", encryption=attacker.public.encryption
    )
    report = world.seal()
    token = hostile.forge_token(
        world.secrets["seoul"],
        swapped,
        recipient="tokyo",
        report_id=report.report_id,
        digest_=report.digest,
        size=report.size,
        content_key=report.content_key,
        scope=report.header.scope,
        level=report.header.level,
        not_before=world.now - 10,
        not_after=world.now + 60,
        originator="seoul",
    )
    with pytest.raises(Refused) as caught:
        world.check(token, "tokyo")
    assert caught.value.reason is Reason.WRONG_ARRANGEMENT


def test_token_sealed_to_a_substituted_key_does_not_open(world: World) -> None:
    # Even under the real arrangement id, a key sealed to the attacker fails opaquely.
    attacker = MemberSecret.generate()
    report = world.seal()
    token = hostile.forge_token(
        world.secrets["seoul"],
        world.arrangement,
        recipient="tokyo",
        report_id=report.report_id,
        digest_=report.digest,
        size=report.size,
        content_key=report.content_key,
        scope=report.header.scope,
        level=report.header.level,
        not_before=world.now - 10,
        not_after=world.now + 60,
        originator="seoul",
        sealed_to=attacker.public.encryption,
        signed_prekey=world.signed_prekey_key("tokyo"),
    )
    with pytest.raises(VerificationError):
        world.check(token, "tokyo")
    # The attacker, holding the identity key the key was wrapped to (but not Tokyo's
    # prekey secret), cannot unwrap it either: the prekey is part of the derivation.
    wrap = ReleaseToken.decode(token).wrap
    with pytest.raises(VerificationError):
        unwrap_content_key(
            wrap,
            ReleaseToken.decode(token).associated_data,
            attacker,
            lambda kind, public: bytes(32),
        )


def test_handshake_with_a_substituted_relay_key(world: World) -> None:
    member = MemberHandshake(world.secrets["seoul"], "seoul", world.arrangement)
    impostor = hostile.ImpostorRelay(world.outsider, world.arrangement)
    with pytest.raises(VerificationError):
        member.receive(impostor.receive(member.start()))


def test_handshake_with_a_substituted_member_key(world: World) -> None:
    relay = RelayHandshake(world.secrets["washington"], world.arrangement)
    impostor = hostile.ImpostorMember(world.outsider, "tokyo", world.arrangement)
    welcome = relay.receive(impostor.start())
    assert welcome is not None
    with pytest.raises(VerificationError):
        relay.receive(impostor.receive(welcome))


def test_handshake_with_a_key_substituted_arrangement(world: World) -> None:
    # The relay serves an arrangement in which it swapped Seoul's key for its own: a
    # member holding the real one is refused before any cryptography, and vice versa.
    swapped = hostile.substitute_key(
        world.arrangement, "seoul", signing=world.outsider.public.signing
    )
    relay = RelayHandshake(world.secrets["washington"], swapped)
    member = MemberHandshake(world.secrets["seoul"], "seoul", world.arrangement)
    with pytest.raises(Refused) as caught:
        relay.receive(member.start())
    assert caught.value.reason is Reason.WRONG_ARRANGEMENT


def test_signing_key_is_not_an_encryption_key(world: World) -> None:
    seoul = world.secrets["seoul"].public
    with pytest.raises(UsageError):
        PublicIdentity(seoul.encryption, seoul.signing)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        check_for_recipient(
            world.token(world.seal()),
            world.arrangement,
            world.secrets["seoul"],
            "tokyo",
            now=world.now,
        )


def test_member_reusing_another_members_key_is_refused(world: World) -> None:
    tokyo = world.secrets["tokyo"].public
    with pytest.raises(UsageError):
        hostile.substitute_key(world.arrangement, "canberra", signing=tokyo.signing)
    with pytest.raises(UsageError):
        hostile.substitute_key(world.arrangement, "canberra", encryption=tokyo.encryption)


# --- signatures of one kind used as another --------------------------------------------------


def _verifiers(world: World, report: Any) -> dict[str, Any]:
    a = world.arrangement
    return {
        "token": lambda data: check_for_recipient(
            data,
            a,
            world.secrets["tokyo"],
            "tokyo",
            now=world.now,
            prekey_secret=world.prekey_lookup("tokyo"),
        ),
        "token@relay": lambda data: check_for_relay(
            data,
            a,
            report_id=report.report_id,
            digest=report.digest,
            size=report.size,
            originator="seoul",
            now=world.now,
        ),
        "receipt": lambda data: Receipt.verify(data, a),
        "ack": lambda data: StoredAck.verify(data, a),
        "checkpoint": lambda data: Checkpoint.verify(data, a),
    }


_KIND_CONTEXT = {
    "token": Context.TOKEN,
    "token@relay": Context.TOKEN,
    "receipt": Context.RECEIPT,
    "ack": Context.ACK,
    "checkpoint": Context.AUDIT,
}
_SIGNER = {
    "token": "seoul",
    "token@relay": "seoul",
    "receipt": "tokyo",
    "ack": "washington",
    "checkpoint": "washington",
}


def _valid_bodies(world: World, report: Any) -> dict[str, bytes]:
    token = world.token(report)
    receipt = Receipt.issue(
        world.secrets["tokyo"],
        world.arrangement,
        report=report.report_id,
        token=ReleaseToken.decode(token).id,
        originator="seoul",
        recipient="tokyo",
        digest=report.digest,
        received=world.now,
    )
    ack = StoredAck.issue(
        world.secrets["washington"],
        world.arrangement,
        report=report.report_id,
        originator="seoul",
        digest=report.digest,
        size=report.size,
        stored=world.now,
    )
    checkpoint = Checkpoint.issue(
        world.secrets["washington"], world.arrangement, seq=0, head=bytes(32), time=world.now
    )
    return {
        "token": token,
        "token@relay": token,
        "receipt": receipt.encoded,
        "ack": ack.encoded,
        "checkpoint": checkpoint.encoded,
    }


def test_right_body_signed_in_every_wrong_context(world: World) -> None:
    # A signer signs the exact body the verifier expects, by the key it expects, but in
    # another context (as a receipt, an audit checkpoint, a handshake, ...): refused.
    # tests/test_cross_kind.py feeds whole objects of one kind to the other verifiers;
    # this covers the chosen-body case, where only the context label differs.
    report = world.seal()
    verifiers = _verifiers(world, report)
    bodies = _valid_bodies(world, report)
    for kind, verifier in verifiers.items():
        verifier(bodies[kind])  # the honest object verifies
        signer = world.secrets[_SIGNER[kind]]
        for context in Context:
            if context is _KIND_CONTEXT[kind]:
                continue
            forged = hostile.retarget_envelope(bodies[kind], signer, context)
            with pytest.raises(VerificationError):
                verifier(forged)
        body, _ = hostile.envelope_parts(bodies[kind])
        bare = enc.pack({"body": body, "sig": hostile.sign_without_context(signer, body)})
        with pytest.raises(VerificationError):
            verifier(bare)


def test_arrangement_signature_in_another_context(world: World) -> None:
    a = world.arrangement
    for context in Context:
        if context is Context.ARRANGEMENT:
            continue
        signature = world.secrets["seoul"].sign(context, a.id)
        with pytest.raises(VerificationError):
            world.signed.with_signature("seoul", signature)


def test_report_header_signed_in_another_context(world: World) -> None:
    report = world.seal()
    secret = world.secrets["seoul"]
    for context in (Context.TOKEN, Context.RECEIPT, Context.ARRANGEMENT, Context.AUDIT):
        forged = hostile.rewrite_report(
            report, lambda h, s, rest, c=context: (h, secret.sign(c, h), rest)
        )
        token = world.token(forged)
        with pytest.raises(VerificationError):
            open_report(forged.ciphertext, world.check(token).opener(world.arrangement))


def test_handshake_signatures_do_not_cross_roles(world: World) -> None:
    # The relay's welcome signature re-used as a member's finish signature: the member
    # name differs, and the context does too.
    relay = RelayHandshake(world.secrets["washington"], world.arrangement)
    member = hostile.ImpostorMember(world.secrets["seoul"], "seoul", world.arrangement)
    welcome = relay.receive(member.start())
    assert welcome is not None
    welcome_sig = enc.unpack(welcome)["sig"]
    finish = enc.unpack(member.receive(welcome))
    finish["sig"] = welcome_sig
    with pytest.raises(VerificationError):
        relay.receive(enc.pack(finish))


# --- malleated signatures ----------------------------------------------------------------------


def test_malleated_signatures_are_refused_everywhere(world: World) -> None:
    report = world.seal()
    verifiers = _verifiers(world, report)
    for kind, data in _valid_bodies(world, report).items():
        with pytest.raises(VerificationError):
            verifiers[kind](hostile.malleate_envelope(data))


def test_malleated_arrangement_signature(world: World) -> None:
    signature = world.signed.signatures["seoul"]
    with pytest.raises(VerificationError):
        SignedArrangement(world.arrangement, {"seoul": hostile.malleate_signature(signature)})


def test_malleated_report_header_signature(world: World) -> None:
    report = world.seal()
    forged = hostile.rewrite_report(
        report, lambda h, s, rest: (h, hostile.malleate_signature(s), rest)
    )
    token = world.token(forged)
    with pytest.raises(VerificationError):
        open_report(forged.ciphertext, world.check(token).opener(world.arrangement))


def test_malleated_handshake_signatures(world: World) -> None:
    relay = RelayHandshake(world.secrets["washington"], world.arrangement)
    member = MemberHandshake(world.secrets["seoul"], "seoul", world.arrangement)
    welcome = relay.receive(member.start())
    assert welcome is not None
    fields = enc.unpack(welcome)
    fields["sig"] = hostile.malleate_signature(fields["sig"])
    with pytest.raises(VerificationError):
        member.receive(enc.pack(fields))

    relay = RelayHandshake(world.secrets["washington"], world.arrangement)
    member = MemberHandshake(world.secrets["seoul"], "seoul", world.arrangement)
    welcome = relay.receive(member.start())
    assert welcome is not None
    finish = enc.unpack(member.receive(welcome))
    finish["sig"] = hostile.malleate_signature(finish["sig"])
    with pytest.raises(VerificationError):
        relay.receive(enc.pack(finish))


def test_malleated_signature_still_satisfies_the_group_equation(world: World) -> None:
    # The attack is real: S + L reduces to S mod L, so a verifier that reduced S first
    # would accept it. libsodium refuses S >= L; this shows the input is the real attack.
    signature = world.secrets["seoul"].sign(Context.TOKEN, b"x")
    malleated = hostile.malleate_signature(signature)
    s = int.from_bytes(malleated[32:], "little")
    assert s >= hostile.ED25519_ORDER
    assert s % hostile.ED25519_ORDER == int.from_bytes(signature[32:], "little")


# --- non-canonical encodings ---------------------------------------------------------------


def test_validly_signed_noncanonical_token_bodies_are_refused(world: World) -> None:
    report = world.seal()
    token = world.token(report)
    body, _ = hostile.envelope_parts(token)
    variants = list(hostile.noncanonical_variants(body))
    assert {label for label, _ in variants} >= {"wide int", "wide str", "wide bin", "wide map"}
    for _label, variant in variants:
        # Signed by the real originator over the exact non-canonical bytes.
        forged = hostile.sign_envelope(world.secrets["seoul"], Context.TOKEN, variant)
        with pytest.raises(ProtocolError):
            world.check(forged, "tokyo")
        with pytest.raises(ProtocolError):
            ReleaseToken.decode(forged)


def test_noncanonical_envelopes_are_refused(world: World) -> None:
    report = world.seal()
    bodies = _valid_bodies(world, report)
    verifiers = _verifiers(world, report)
    for kind, data in bodies.items():
        for _label, variant in hostile.noncanonical_variants(data):
            with pytest.raises(ProtocolError):
                verifiers[kind](variant)


def test_noncanonical_receipt_ack_checkpoint_bodies(world: World) -> None:
    report = world.seal()
    bodies = _valid_bodies(world, report)
    verifiers = _verifiers(world, report)
    for kind in ("receipt", "ack", "checkpoint"):
        body, _ = hostile.envelope_parts(bodies[kind])
        signer = world.secrets[_SIGNER[kind]]
        for _label, variant in hostile.noncanonical_variants(body):
            forged = hostile.sign_envelope(signer, _KIND_CONTEXT[kind], variant)
            with pytest.raises(ProtocolError):
                verifiers[kind](forged)


def test_noncanonical_report_header_is_refused_opaquely(world: World) -> None:
    # The originator signs a non-canonical header: the recipient refuses it, opaquely,
    # since the header lives inside the ciphertext.
    report = world.seal()
    secret = world.secrets["seoul"]
    header, _, _ = hostile.split_plaintext(
        hostile.open_raw(report.ciphertext, report.content_key, report.report_id)
    )
    for _label, variant in hostile.noncanonical_variants(header):
        if _label.startswith("trailing"):
            continue  # a trailing byte changes the length prefix; covered by fuzzing
        forged = hostile.rewrite_report(
            report, lambda h, s, rest, v=variant: (v, secret.sign(Context.REPORT, v), rest)
        )
        token = world.token(forged)
        with pytest.raises(VerificationError):
            open_report(forged.ciphertext, world.check(token).opener(world.arrangement))


def test_noncanonical_arrangement_is_refused(world: World) -> None:
    for _label, variant in hostile.noncanonical_variants(world.arrangement.encoded):
        with pytest.raises(ProtocolError):
            Arrangement.decode(variant)
    for _label, variant in hostile.noncanonical_variants(world.signed.encode()):
        with pytest.raises(ProtocolError):
            SignedArrangement.decode(variant)


def test_noncanonical_handshake_messages_are_refused(world: World) -> None:
    member = MemberHandshake(world.secrets["seoul"], "seoul", world.arrangement)
    hello = member.start()
    for _label, variant in hostile.noncanonical_variants(hello):
        relay = RelayHandshake(world.secrets["washington"], world.arrangement)
        with pytest.raises(ProtocolError):
            relay.receive(variant)
    relay = RelayHandshake(world.secrets["washington"], world.arrangement)
    welcome = relay.receive(hello)
    assert welcome is not None
    for _label, variant in hostile.noncanonical_variants(welcome):
        fresh = MemberHandshake(world.secrets["seoul"], "seoul", world.arrangement)
        fresh.start()
        with pytest.raises(ProtocolError):
            fresh.receive(variant)


def test_rewrite_report_control_opens(world: World) -> None:
    # The control for the rewrite tests above: re-encrypting and re-signing the same
    # header canonically, as the originator, gives a report that opens.
    report = world.seal(b"control")
    secret = world.secrets["seoul"]
    same = hostile.rewrite_report(
        report, lambda h, s, rest: (h, secret.sign(Context.REPORT, h), rest)
    )
    assert same.ciphertext != report.ciphertext or same.digest == report.digest
    opened = open_report(same.ciphertext, world.check(world.token(same)).opener(world.arrangement))
    assert opened.body == b"control"
