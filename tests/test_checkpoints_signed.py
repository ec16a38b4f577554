"""Checkpoints that cover everything they state (format ``django-encounters-checkpoint/2``):
the root covers every field, an Ed25519 signature names its key, and what claims to have been
recorded before the checkpoint must be in it. The attacks of issue 19 (a forged row appended
with a correct public hash and an earlier recording time, a backdated encounter, a file
re-rooted and re-signed with another key, an encounter moved out of the audited definition),
each on SQLite and PostgreSQL, without seal keys."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import subprocess
from datetime import timedelta
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from django.utils import timezone

from django_encounters import store
from django_encounters.engine import genesis_hash
from django_encounters.models import Encounter
from django_encounters.projections.audit import audit_encounters, iter_audit
from django_encounters.projections.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_1,
    CheckpointEntry,
    CheckpointError,
    fingerprint,
    read_checkpoint,
    root_digest,
    verify_checkpoint,
    write_checkpoint,
)
from django_encounters.projections.checkpoints import building as checkpoint_building
from django_encounters.projections.checkpoints.signing import sign
from django_encounters.services import create_encounter, get_state_at, transition
from tests.helpers import audit_against as against
from tests.helpers import (
    forge_projection,
    insert_row_raw,
    plain_audit_is_clean,
    raw_update,
    rehash_from,
    reload,
    rewrite_row,
    run_command,
)

pytestmark = pytest.mark.django_db


def found(data: dict) -> list[tuple[str, int, str]]:
    return sorted(
        (e["id"], a["sequence"], a["kind"])
        for e in data.get("encounters", [])
        for a in e["anomalies"]
    )


@pytest.fixture
def clinic(visit_definition, employment_definition, patient, device, user):
    """A visit seen through (3 rows), a fresh visit (no rows), an employment (2 rows)."""
    seen = create_encounter(visit_definition, patient)
    for state in ("checked_in", "in_progress", "completed"):
        transition(seen, state, transitioned_by=user, reason=f"to {state}")
    fresh = create_encounter(visit_definition, device)
    job = create_encounter(employment_definition, patient)
    transition(job, "working")
    transition(job, "onleave")
    return {"seen": seen, "fresh": fresh, "job": job}


@pytest.fixture
def keys(tmp_path):
    """Two Ed25519 key pairs as PEM files — the operator's and an attacker's — generated
    here: ``keys.own`` / ``keys.own_pub`` and ``keys.other`` / ``keys.other_pub``."""
    paths: dict[str, Any] = {}
    for name in ("own", "other"):
        private = ed25519.Ed25519PrivateKey.generate()
        key_path = tmp_path / f"{name}.pem"
        key_path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        pub_path = tmp_path / f"{name}.pub.pem"
        pub_path.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        paths[name], paths[f"{name}_pub"], paths[f"{name}_key"] = key_path, pub_path, private
    return SimpleNamespace(**paths)


def checkpoint_at(monkeypatch: Any, path: Any, later: timedelta, **options: Any) -> dict:
    """Write a checkpoint as if taken ``later`` than now (the rows so far are then recorded
    well before it), and return its JSON."""
    real_now = timezone.now
    monkeypatch.setattr(
        checkpoint_building, "timezone", SimpleNamespace(now=lambda: real_now() + later)
    )
    try:
        write_checkpoint(path, **options)
    finally:
        monkeypatch.setattr(checkpoint_building, "timezone", timezone)
    return json.loads(path.read_text(encoding="utf-8"))


def entries_of(data: dict) -> list[CheckpointEntry]:
    return [
        CheckpointEntry(UUID(e["id"]), e["version"], e["head_hash"]) for e in data["encounters"]
    ]


def as_format_1(data: dict) -> dict:
    """The checkpoint as format /1 wrote it: no signature, a root over the entries only."""
    return {
        "format": CHECKPOINT_FORMAT_1,
        "created_at": data["created_at"],
        "definition": data["definition"],
        "encounters": data["encounters"],
        "count": data["count"],
        "root": root_digest(entries_of(data), fmt=CHECKPOINT_FORMAT_1),
    }


def write_json(path: Any, data: dict) -> Any:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def forge_append(encounter: Any, to_state: str, recorded: Any) -> int:
    """What the application's database role can do (INSERT into the log, UPDATE of the
    encounter row): append the next row with the hash the documented layout gives — recorded,
    it says, at ``recorded`` — and put the projection in line. Returns its sequence."""
    fresh = reload(encounter)
    last = store.load_stream(fresh.pk, "default")[-1]
    recorded = max(recorded, last.transitioned_at + timedelta(milliseconds=1))
    insert_row_raw(
        fresh,
        sequence=fresh.version + 1,
        from_state=fresh.state,
        to_state=to_state,
        effective_at=recorded,
        transitioned_at=recorded,
        reason="forged",
    )
    forge_projection(fresh)
    return fresh.version + 1


def backdate_creation(encounter: Any, by: timedelta) -> None:
    """Move an encounter's creation back and recompute its genesis hash (and chain, and
    projection) by the documented layout: clean to the chain."""
    fresh = reload(encounter)
    moved = fresh.created_at - by
    forged = genesis_hash(dataclasses.replace(fresh.genesis(), created_at=moved))
    raw_update(Encounter, fresh.pk, created_at=moved, genesis_hash=forged)
    if fresh.version:
        rehash_from(fresh, 1)
    forge_projection(fresh)


# ---------------------------------------------------------------------------------------------
# The root covers every field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("definition", [None, "EMPLOYMENT"])
def test_the_documented_jq_recipe_recomputes_the_root(clinic, tmp_path, definition):
    """The recipe of checkpoints/__init__.py and docs/operations.md, run as documented."""
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed")
    path = tmp_path / "cp.json"
    written = write_checkpoint(path, definition=definition)
    recipe = (
        '.format, "created_at \\(.created_at)", "definition \\(.definition | tojson)", '
        '(.encounters[] | "\\(.id) \\(.version) \\(.head_hash)"), "count \\(.count)"'
    )
    text = subprocess.run(["jq", "-r", recipe, str(path)], check=True, capture_output=True).stdout
    assert hashlib.sha256(text).hexdigest() == written.root
    data = json.loads(path.read_text())
    assert text.decode().splitlines()[2] == f"definition {json.dumps(definition)}"
    version_1 = write_json(tmp_path / "v1.json", as_format_1(data))
    text = subprocess.run(
        ["jq", "-r", '.encounters[] | "\\(.id) \\(.version) \\(.head_hash)"', str(version_1)],
        check=True,
        capture_output=True,
    ).stdout
    assert (
        hashlib.sha256(f"{CHECKPOINT_FORMAT_1}\n".encode() + text).hexdigest()
        == (as_format_1(data)["root"])
    )


EDITS = {
    "created_at moved back a day": lambda d: d.update(
        created_at=d["created_at"].replace(d["created_at"][:4], str(int(d["created_at"][:4]) - 1))
    ),
    "created_at in another offset": lambda d: d.update(created_at=d["created_at"][:-6] + "+01:00"),
    "the definition scope dropped": lambda d: d.update(definition=None),
    "another definition": lambda d: d.update(definition="VISIT"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_every_header_field_is_covered_by_the_root(clinic, tmp_path, edit):
    path = tmp_path / "cp.json"
    write_checkpoint(path, definition="EMPLOYMENT")
    data = json.loads(path.read_text())
    EDITS[edit](data)
    write_json(path, data)

    code, out, err = run_command("audit_encounters", "--against", str(path))

    assert (code, out) == (2, "")
    assert f"checkpoint {path}: the root {data['root']} does not match its fields" in err


def test_a_header_after_the_entries_is_refused(clinic, tmp_path):
    """The root starts with the header: a file must state it first (the writer does)."""
    path = tmp_path / "cp.json"
    write_checkpoint(path)
    data = json.loads(path.read_text())
    moved = {"format": data.pop("format"), "encounters": data.pop("encounters"), **data}
    write_json(path, moved)

    code, out, err = run_command("audit_encounters", "--against", str(path))

    assert (code, out) == (2, "")
    assert "created_at, definition missing (format, created_at and definition come before" in err
    assert verify_checkpoint(moved).anomalies == []  # parsed JSON has no order to keep


# ---------------------------------------------------------------------------------------------
# Format /1 still verifies, and says what it does not cover
# ---------------------------------------------------------------------------------------------


def test_a_format_1_checkpoint_still_verifies_and_says_created_at_is_not_covered(
    clinic, tmp_path, keys
):
    path = tmp_path / "cp.json"
    write_checkpoint(path)
    data = as_format_1(json.loads(path.read_text()))
    write_json(path, data)

    code, report, err = against(path, "--root", data["root"])
    assert (code, err) == (0, "")
    assert report["checkpoint"]["format"] == CHECKPOINT_FORMAT_1
    assert report["checkpoint"]["created_at_covered"] is False
    assert report["checkpoint"]["signature"] is None
    code, out, _ = run_command("audit_encounters", "--against", str(path))
    assert code == 0
    assert f"({CHECKPOINT_FORMAT_1}) of " in out.splitlines()[1]
    assert "(not covered by the root), root " in out.splitlines()[1]

    # What /1 cannot prove: its time is not covered, an edited one passes the root.
    data["created_at"] = "2001-01-01T00:00:00+00:00"
    write_json(path, data)
    assert against(path, "--root", data["root"])[0] == 0
    # It still catches a recomputed chain.
    seen = clinic["seen"]
    rewrite_row(seen, 2, reason="forged")
    rehash_from(seen, 2)
    forge_projection(seen)
    code, report, _ = against(path)
    assert (str(seen.pk), 3, "rewritten") in found(report)
    # A /1 file has no signature: refused with --verify-key, and a signature key is foreign.
    code, out, err = run_command(
        "audit_encounters", "--against", str(path), "--verify-key", str(keys.own_pub)
    )
    assert (code, out) == (2, "")
    assert f"checkpoint {path}: it is not signed, and a verify key" in err
    data["signature"] = None
    write_json(path, data)
    code, _, err = run_command("audit_encounters", "--against", str(path))
    assert code == 2 and f"unexpected key 'signature' in a {CHECKPOINT_FORMAT_1} file" in err


# ---------------------------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------------------------


def test_a_signed_checkpoint_verifies_with_its_public_key(clinic, tmp_path, keys):
    path = tmp_path / "cp.json"

    code, out, err = run_command(
        "checkpoint_encounters", "--output", str(path), "--signing-key", str(keys.own)
    )

    assert (code, err) == (0, "")
    data = json.loads(path.read_text())
    own = fingerprint(keys.own_key.public_key())
    assert data["signature"]["algorithm"] == "ed25519" and data["signature"]["key"] == own
    assert f"signed with the key {own}); its root:" in out
    assert out.splitlines()[-1] == data["root"]
    der = keys.own_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert own == "sha256:" + hashlib.sha256(der).hexdigest()  # the documented fingerprint
    signed = f"{CHECKPOINT_FORMAT} {data['root']} {own}\n".encode()
    keys.own_key.public_key().verify(base64.b64decode(data["signature"]["value"]), signed)

    code, report, err = against(path, "--verify-key", str(keys.own_pub), "--root", data["root"])
    assert (code, err) == (0, "")
    assert report["checkpoint"]["signature"] == {"key": own, "verified": True}
    code, out, _ = run_command(
        "audit_encounters", "--against", str(path), "--verify-key", str(keys.own_pub)
    )
    assert f"signature verified with the key {own}:" in out.splitlines()[1]
    # Without --verify-key the signature is reported, not checked.
    code, report, _ = against(path)
    assert code == 0 and report["checkpoint"]["signature"] == {"key": own, "verified": False}
    code, out, _ = run_command("audit_encounters", "--against", str(path))
    assert f"signed by the key {own}, not checked (no verify key given)" in out.splitlines()[1]


def test_the_documented_openssl_recipe_verifies_the_signature(clinic, tmp_path, keys):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    path = tmp_path / "cp.json"
    write_checkpoint(path, signing_key=keys.own)
    data = json.loads(path.read_text())
    (tmp_path / "signed.txt").write_text(
        f"{CHECKPOINT_FORMAT} {data['root']} {data['signature']['key']}\n"
    )
    (tmp_path / "signature.bin").write_bytes(base64.b64decode(data["signature"]["value"]))
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(keys.own_pub), "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    assert "sha256:" + hashlib.sha256(der).hexdigest() == data["signature"]["key"]

    def openssl_verify(public: Any) -> int:
        return subprocess.run(
            ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(public), "-rawin"]
            + ["-in", str(tmp_path / "signed.txt"), "-sigfile", str(tmp_path / "signature.bin")],
            capture_output=True,
        ).returncode

    assert openssl_verify(keys.own_pub) == 0
    assert openssl_verify(keys.other_pub) != 0


def test_a_file_re_rooted_and_re_signed_with_another_key_is_refused(clinic, tmp_path, keys):
    """The attacker rewrites a stream (chain, projection), edits the checkpoint's entry to
    match, recomputes the root and signs it with a key of their own: self-consistent, and
    refused with the operator's public key."""
    path = tmp_path / "cp.json"
    write_checkpoint(path, signing_key=keys.own)
    seen = clinic["seen"]
    rewrite_row(seen, 2, reason="forged")
    rehash_from(seen, 2)
    forge_projection(seen)
    data = json.loads(path.read_text())
    forged = reload(seen)
    for entry in data["encounters"]:
        if entry["id"] == str(seen.pk):
            entry.update(version=forged.version, head_hash=forged.head_hash)
    data["root"] = root_digest(entries_of(data), created_at=data["created_at"])
    data["signature"] = sign(keys.other_key, data["root"])
    write_json(path, data)
    assert against(path)[0] == 0  # consistent with the forged log

    code, out, err = run_command(
        "audit_encounters", "--against", str(path), "--verify-key", str(keys.own_pub)
    )

    assert (code, out) == (2, "")
    own, other = (fingerprint(k.public_key()) for k in (keys.own_key, keys.other_key))
    assert (
        f"CommandError: checkpoint {path}: it is signed with the key {other}, not with the "
        f"verify key {own}: refused" in err
    )
    # Keeping the operator's key id on the forged signature does not help.
    data["signature"]["key"] = own
    write_json(path, data)
    code, out, err = run_command(
        "audit_encounters", "--against", str(path), "--verify-key", str(keys.own_pub)
    )
    assert (code, out) == (2, "")
    assert f"checkpoint {path}: its signature does not verify with the key {own}" in err
    with pytest.raises(CheckpointError, match="does not verify"):
        verify_checkpoint(path, verify_key=keys.own_key.public_key())


def test_a_re_rooted_file_keeping_the_signature_is_refused(clinic, tmp_path, keys):
    path = tmp_path / "cp.json"
    write_checkpoint(path, signing_key=keys.own)
    data = json.loads(path.read_text())
    data["encounters"][0]["version"] += 1
    data["root"] = root_digest(entries_of(data), created_at=data["created_at"])
    write_json(path, data)

    code, out, err = run_command(
        "audit_encounters", "--against", str(path), "--verify-key", str(keys.own_pub)
    )

    assert (code, out) == (2, "")
    assert "its signature does not verify with the key sha256:" in err


def test_an_unsigned_file_is_refused_when_a_key_is_given(clinic, tmp_path, keys):
    path = tmp_path / "cp.json"
    write_checkpoint(path)
    for fmt in ("table", "json", "csv"):
        code, out, err = run_command(
            "audit_encounters",
            "--against",
            str(path),
            "--verify-key",
            str(keys.own_pub),
            "--format",
            fmt,
        )
        assert (code, out) == (2, "")
        assert f"CommandError: checkpoint {path}: it is not signed, and a verify key" in err
    code, _, err = run_command("audit_encounters", "--verify-key", str(keys.own_pub))
    assert code == 2 and "--verify-key checks the signature of a checkpoint: give --against" in err


def test_the_api_signs_and_verifies_with_key_objects_and_pem_bytes(clinic, tmp_path, keys):
    path = tmp_path / "cp.json"
    written = write_checkpoint(path, signing_key=keys.own_key)
    own = fingerprint(keys.own_key.public_key())
    assert written.signed_by == own
    for key in (keys.own_key.public_key(), keys.own_pub.read_bytes(), str(keys.own_pub)):
        check = verify_checkpoint(path, verify_key=key)
        assert (check.signed_by, check.signature_verified) == (own, True)
    description, _ = read_checkpoint(path, verify_key=keys.own_pub)
    assert description.signature_verified
    stream = iter_audit(against=path, verify_key=keys.own_pub)
    assert stream.checkpoint.signature_verified and list(stream)
    with pytest.raises(CheckpointError, match="not with the verify key"):
        audit_encounters(against=path, verify_key=keys.other_pub)
    with pytest.raises(ValueError, match="give against too"):
        iter_audit(verify_key=keys.own_pub)


def test_keys_that_cannot_be_used_write_nothing_and_verify_nothing(clinic, tmp_path, keys):
    path = tmp_path / "cp.json"
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        keys.own_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    signing = {
        keys.own_pub: "is not a PKCS#8 PEM private key",
        rsa_key: "is a RSAPrivateKey, not an Ed25519 key",
        encrypted: "is encrypted",
        garbage: "is not a PKCS#8 PEM private key",
        tmp_path / "absent.pem": "cannot read: No such file or directory",
    }
    for key, message in signing.items():
        code, out, err = run_command(
            "checkpoint_encounters", "--output", str(path), "--signing-key", str(key)
        )
        assert (code, out) == (2, ""), key
        assert f"checkpoint {path}: the signing key {key}" in err and message in err, err
        assert not path.exists()

    write_checkpoint(path, signing_key=keys.own)
    verifying = {
        keys.own: "is a private key: give its public key",
        garbage: "is not a PEM public key",
        tmp_path / "absent.pem": "cannot read",
    }
    for key, message in verifying.items():
        code, out, err = run_command(
            "audit_encounters", "--against", str(path), "--verify-key", str(key)
        )
        assert (code, out) == (2, "")
        assert f"checkpoint {path}: the verify key {key}" in err and message in err, err


SIGNATURES = {
    "not an object": ("signed", "signature must be null or an object"),
    "another algorithm": (
        {"algorithm": "rsa", "key": "sha256:" + "0" * 64, "value": ""},
        "signature algorithm 'rsa' is not 'ed25519'",
    ),
    "a bad key id": (
        {"algorithm": "ed25519", "key": "me", "value": ""},
        "signature key 'me' is not sha256:",
    ),
    "a short value": (
        {"algorithm": "ed25519", "key": "sha256:" + "0" * 64, "value": "AAAA"},
        "signature value is not 64 bytes in base64",
    ),
}


@pytest.mark.parametrize("case", list(SIGNATURES))
def test_a_malformed_signature_is_refused(clinic, tmp_path, case):
    path = tmp_path / "cp.json"
    write_checkpoint(path)
    data = json.loads(path.read_text())
    data["signature"], message = SIGNATURES[case]
    write_json(path, data)

    code, out, err = run_command("audit_encounters", "--against", str(path))

    assert (code, out) == (2, "")
    assert f"checkpoint {path}: {message}" in err


# ---------------------------------------------------------------------------------------------
# Recorded before the checkpoint: it must be in it (no seal keys needed)
# ---------------------------------------------------------------------------------------------


def test_a_forged_row_claiming_an_earlier_recording_time_is_caught(clinic, tmp_path, monkeypatch):
    """Issue 19, attack 1: a row appended by plain INSERT with the hash the public layout
    gives, and the encounter row updated to match. The chain, the rebuild check and the audit
    against the checkpoint's prefixes see nothing; its recording time, earlier than the
    checkpoint's, which does not have it, gives it away."""
    path = tmp_path / "cp.json"
    data = checkpoint_at(monkeypatch, path, timedelta(hours=1))
    created = data["created_at"]
    job = clinic["job"]
    sequence = forge_append(job, "working", timezone.now())
    assert plain_audit_is_clean()
    before = timezone.now() + timedelta(minutes=30)  # before the checkpoint's time
    assert get_state_at(reload(job), before, known_at=before) == "working"  # the forged state

    code, report, err = against(path)

    assert code == 1 and "1 anomaly found" in err
    assert found(report) == [(str(job.pk), sequence, "unrecorded")]
    (anomaly,) = report["encounters"][-1]["anomalies"]
    assert f"row {sequence} claims to have been recorded at " in anomaly["detail"]
    assert f"which has the stream at version {sequence - 1}" in anomaly["detail"]
    assert (
        f"more than 300 s (the clock tolerance) before the checkpoint of {created}"
        in (anomaly["detail"])
    )
    assert report["checkpoint"]["created_at"] == created
    # Whatever the selection: another definition, another encounter.
    for selection in (("--definition", "VISIT"), ("--encounter", str(clinic["seen"].pk))):
        code, report, _ = against(path, *selection)
        assert code == 1 and found(report) == [(str(job.pk), sequence, "unrecorded")]
        assert report["encounters"][-1]["outside_selection"] is True


def test_rows_recorded_after_the_checkpoint_or_within_the_tolerance_are_not_findings(
    clinic, tmp_path, monkeypatch, settings
):
    path = tmp_path / "cp.json"
    checkpoint_at(monkeypatch, path, timedelta(minutes=3))
    # Recorded (the real clock) less than the 5 minutes' tolerance before the checkpoint's time.
    transition(clinic["fresh"], "checked_in")
    forge_append(clinic["job"], "working", timezone.now())
    assert against(path)[0] == 0
    settings.ENCOUNTERS_FUTURE_TOLERANCE = timedelta(minutes=1)
    code, report, _ = against(path)
    assert code == 1
    assert report["checkpoint"]["tolerance_seconds"] == 60.0
    assert {(pk, kind) for pk, _, kind in found(report)} == {
        (str(clinic["fresh"].pk), "unrecorded"),
        (str(clinic["job"].pk), "unrecorded"),
    }


def test_an_encounter_created_before_the_checkpoint_and_absent_from_it_is_caught(
    clinic, tmp_path, visit_definition, employment_definition, patient
):
    """A new encounter (and its row) inserted after the checkpoint, dated a day before it,
    with a correct genesis hash: clean to the chain, caught against the checkpoint whatever
    the selection. One dated after the checkpoint is what it says: no finding."""
    path = tmp_path / "cp.json"
    write_checkpoint(path)
    backdated = create_encounter(employment_definition, patient)
    transition(backdated, "working")
    backdate_creation(backdated, timedelta(days=1))
    later = create_encounter(visit_definition, patient)
    assert plain_audit_is_clean()

    expected = [(str(backdated.pk), 0, "uncheckpointed")]
    for selection in ((), ("--definition", "VISIT"), ("--encounter", str(later.pk))):
        code, report, _ = against(path, *selection)
        assert code == 1 and found(report) == expected, selection
    (audit,) = [e for e in report["encounters"] if e["id"] == str(backdated.pk)]
    assert audit["outside_selection"] is True
    assert "the encounter claims to have been created at " in audit["anomalies"][0]["detail"]
    assert "which does not have it" in audit["anomalies"][0]["detail"]
    # Its row, moved back too, is a row the checkpoint does not have.
    (row,) = store.load_stream(backdated.pk, "default")
    moved = row.transitioned_at - timedelta(days=1)
    rewrite_row(backdated, 1, transitioned_at=moved, effective_at=moved)
    rehash_from(backdated, 1)
    forge_projection(backdated)
    assert plain_audit_is_clean()
    code, report, _ = against(path)
    assert found(report) == sorted(expected + [(str(backdated.pk), 1, "unrecorded")])


def test_a_checkpoint_of_one_definition_vouches_for_that_definition_only(
    clinic, tmp_path, visit_definition, employment_definition, patient
):
    path = tmp_path / "cp.json"
    write_checkpoint(path, definition="EMPLOYMENT")
    visit = create_encounter(visit_definition, patient)
    job = create_encounter(employment_definition, patient)
    backdate_creation(visit, timedelta(days=1))
    backdate_creation(job, timedelta(days=1))

    code, report, _ = against(path)

    assert code == 1 and found(report) == [(str(job.pk), 0, "uncheckpointed")]
    (audit,) = [e for e in report["encounters"] if e["anomalies"]]
    detail = audit["anomalies"][0]["detail"]
    assert "before the checkpoint of definition EMPLOYMENT of " in detail
    assert "which does not have it" in detail
    assert report["checkpoint"]["definition"] == "EMPLOYMENT"


def test_an_encounter_moved_out_of_the_audited_definition_is_not_skipped(
    clinic, tmp_path, employment_definition
):
    """Issue 19, attack 5: the fresh visit is moved to EMPLOYMENT (definition, genesis hash
    and projection recomputed). ``--definition VISIT`` no longer selects it; the checkpoint
    — whole, or of VISIT — still has it, and reports it."""
    whole, visits = tmp_path / "whole.json", tmp_path / "visits.json"
    write_checkpoint(whole, signing_key=None)
    write_checkpoint(visits, definition="VISIT")
    fresh = reload(clinic["fresh"])
    moved = dataclasses.replace(
        fresh.genesis(), definition_id=employment_definition.pk, origin_state="hired"
    )
    raw_update(
        Encounter,
        fresh.pk,
        definition=employment_definition.pk,
        genesis_hash=genesis_hash(moved),
        origin_state="hired",
    )
    forge_projection(fresh)
    code, report, _ = run_command("audit_encounters", "--definition", "VISIT", "--format", "json")
    assert str(fresh.pk) not in report  # the selection no longer has it

    for path in (whole, visits):
        code, report, _ = against(path, "--definition", "VISIT")
        assert code == 1
        assert (str(fresh.pk), 0, "rewritten") in found(report), path
        (audit,) = [e for e in report["encounters"] if e["id"] == str(fresh.pk)]
        assert audit["outside_selection"] is True and audit["definition"] == "EMPLOYMENT"


def test_the_definition_code_of_a_checkpoint_must_be_printable(clinic, tmp_path):
    with pytest.raises(CheckpointError, match="is not printable text"):
        write_checkpoint(tmp_path / "cp.json", definition="EMPLOY\nMENT")
    assert not (tmp_path / "cp.json").exists()


def test_a_finding_outside_the_selection_is_acknowledged_for_its_own_encounter_only(
    clinic, tmp_path, employment_definition, patient
):
    """The audit of one encounter against a checkpoint reports the others' findings too: an
    acknowledgement names the encounter whose finding it is, never another's."""
    from django_encounters.exceptions import AnomalyNotReportedError
    from django_encounters.projections.audit import acknowledge_reported_anomaly

    path = tmp_path / "cp.json"
    write_checkpoint(path)
    backdated = create_encounter(employment_definition, patient)
    backdate_creation(backdated, timedelta(days=1))
    fresh = clinic["fresh"]

    with pytest.raises(AnomalyNotReportedError):
        acknowledge_reported_anomaly(fresh.pk, 0, "uncheckpointed", "not this one", against=path)
    recorded, anomaly = acknowledge_reported_anomaly(
        backdated.pk, 0, "uncheckpointed", "imported from the old system", against=path
    )
    assert (anomaly.encounter_id, anomaly.kind) == (backdated.pk, "uncheckpointed")
    code, report, _ = against(path)
    assert code == 0 and report["acknowledged_count"] == 1
