"""Checkpoints: ``checkpoint_encounters`` writes every encounter's head and a root digest;
``audit_encounters --against FILE`` catches what the hash chain alone cannot — an attacker
with write access who rewrites rows *and* recomputes every later hash and the projection,
truncates a stream and puts the projection back, or deletes an encounter — and refuses a
checkpoint file that is not intact. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from django_encounters import store
from django_encounters.engine import genesis_hash
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.projections.audit import audit_encounters, iter_audit
from django_encounters.projections.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointEntry,
    CheckpointError,
    read_checkpoint,
    root_digest,
    verify_checkpoint,
    write_checkpoint,
)
from django_encounters.projections.checkpoints import building as checkpoint_building
from django_encounters.projections.checkpoints import reading as checkpoint_reading
from django_encounters.services import create_encounter, transition
from tests.helpers import audit_against as against
from tests.helpers import (
    delete_encounter,
    delete_rows,
    forge_projection,
    plain_audit_is_clean,
    raw_update,
    rehash_from,
    reload,
    rewrite_row,
    run_command,
    version_hash_of,
)

pytestmark = pytest.mark.django_db


# ---------------------------------------------------------------------------------------------
# What the audit says (the attacks themselves are in tests/helpers.py)
# ---------------------------------------------------------------------------------------------


def found(data: dict) -> list[tuple[str, int, str]]:
    return [
        (e["id"], a["sequence"], a["kind"])
        for e in data.get("encounters", [])
        for a in e["anomalies"]
    ]


# ---------------------------------------------------------------------------------------------
# A small clinic
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def clinic(visit_definition, employment_definition, patient, device, user):
    """A visit seen through (3 rows), a fresh visit (no rows), a soft-deleted visit with one
    row, and an employment (2 rows)."""
    seen = create_encounter(visit_definition, patient)
    for state in ("checked_in", "in_progress", "completed"):
        transition(seen, state, transitioned_by=user, reason=f"to {state}")
    fresh = create_encounter(visit_definition, device)
    gone = create_encounter(visit_definition, device)
    transition(gone, "checked_in")
    gone.delete()
    job = create_encounter(employment_definition, patient)
    transition(job, "working")
    transition(job, "onleave")
    return {"seen": seen, "fresh": fresh, "gone": gone, "job": job}


@pytest.fixture
def checkpoint(clinic, tmp_path):
    path = tmp_path / "checkpoint.json"
    code, out, err = run_command("checkpoint_encounters", "--output", str(path))
    assert (code, err) == (0, "")
    return path


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def test_the_checkpoint_lists_every_head_and_the_root_is_the_last_line(clinic, tmp_path):
    path = tmp_path / "cp.json"

    code, out, err = run_command("checkpoint_encounters", "--output", str(path))

    assert (code, err) == (0, "")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert out.splitlines()[-1] == data["root"]
    assert f"checkpoint of 4 encounter(s) written to {path}" in out
    assert list(data) == [
        "format",
        "created_at",
        "definition",
        "encounters",
        "count",
        "root",
        "signature",
    ]
    assert (data["format"], data["definition"], data["count"]) == (CHECKPOINT_FORMAT, None, 4)
    assert data["signature"] is None
    expected = sorted((str(e.pk), e.version, e.head_hash) for e in map(reload, clinic.values()))
    assert [(e["id"], e["version"], e["head_hash"]) for e in data["encounters"]] == expected
    by_id = {e["id"]: e for e in data["encounters"]}
    fresh = reload(clinic["fresh"])
    assert by_id[str(fresh.pk)] == {
        "id": str(fresh.pk),
        "version": 0,
        "head_hash": fresh.genesis_hash,
    }
    assert by_id[str(clinic["gone"].pk)]["version"] == 1  # soft-deleted: still checkpointed
    assert all(e["head_hash"].startswith("v3:") for e in data["encounters"])


def test_the_root_follows_the_documented_formula(checkpoint):
    """Anyone can recompute the root without the library: SHA-256 over the format line, the
    created_at and definition lines, one "id version head" line per entry, in file order, and
    the count line — every field of the file but the root and the signature."""
    data = json.loads(checkpoint.read_text(encoding="utf-8"))
    text = (
        f"{CHECKPOINT_FORMAT}\ncreated_at {data['created_at']}\ndefinition null\n"
        + "".join(f"{e['id']} {e['version']} {e['head_hash']}\n" for e in data["encounters"])
        + f"count {data['count']}\n"
    )

    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == data["root"]
    entries = [
        CheckpointEntry(UUID(e["id"]), e["version"], e["head_hash"]) for e in data["encounters"]
    ]
    assert root_digest(entries, created_at=data["created_at"]) == data["root"]


def test_batches_do_not_change_the_checkpoint(clinic, tmp_path):
    """The same entries whatever the batch size (the roots differ by their created_at)."""
    roots = {
        size: write_checkpoint(tmp_path / f"cp{size}.json", batch_size=size).root
        for size in (1, 2, 3, 1000)
    }
    files = {size: json.loads((tmp_path / f"cp{size}.json").read_text()) for size in roots}
    assert all(data["encounters"] == files[1000]["encounters"] for data in files.values())
    for size, data in files.items():
        entries = [
            CheckpointEntry(UUID(e["id"]), e["version"], e["head_hash"]) for e in data["encounters"]
        ]
        assert root_digest(entries, created_at=data["created_at"]) == roots[size]


def test_definition_option_and_api(clinic, tmp_path):
    code, out, _ = run_command(
        "checkpoint_encounters",
        "--output",
        str(tmp_path / "jobs.json"),
        "--definition",
        "EMPLOYMENT",
    )
    assert code == 0
    data = json.loads((tmp_path / "jobs.json").read_text())
    assert data["definition"] == "EMPLOYMENT"
    assert [e["id"] for e in data["encounters"]] == [str(clinic["job"].pk)]
    written = write_checkpoint(tmp_path / "api.json", definition="VISIT")
    assert (written.count, written.definition, written.corrected) == (3, "VISIT", [])
    assert written.root == json.loads((tmp_path / "api.json").read_text())["root"]


def test_an_unknown_definition_writes_nothing(clinic, tmp_path):
    path = tmp_path / "cp.json"

    code, out, err = run_command(
        "checkpoint_encounters", "--output", str(path), "--definition", "NOPE"
    )

    assert code == 2 and out == ""
    assert "no encounter definition has the code 'NOPE'" in err
    assert os.listdir(tmp_path) == []


def test_an_existing_file_is_kept_unless_overwrite(checkpoint):
    before = checkpoint.read_text()

    code, out, err = run_command("checkpoint_encounters", "--output", str(checkpoint))

    assert code == 2 and out == ""
    assert f"checkpoint {checkpoint}: the file exists" in err
    assert "choose a new name, or replace it on purpose with --overwrite" in err
    assert checkpoint.read_text() == before
    assert sorted(os.listdir(checkpoint.parent)) == ["checkpoint.json"]  # no temporary left
    code, out, _ = run_command("checkpoint_encounters", "--output", str(checkpoint), "--overwrite")
    assert code == 0
    assert json.loads(checkpoint.read_text())["root"] == out.splitlines()[-1]


def test_an_unwritable_output_exits_2(clinic, tmp_path):
    code, out, err = run_command(
        "checkpoint_encounters", "--output", str(tmp_path / "no" / "such" / "dir.json")
    )
    assert code == 2 and out == ""
    assert "cannot write" in err and "dir.json" in err


def test_a_failure_midway_leaves_no_file(clinic, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        yield CheckpointEntry(uuid4(), 0, "v2:" + "0" * 64), None
        raise RuntimeError("connection lost")

    monkeypatch.setattr(checkpoint_building, "_heads", broken)
    with pytest.raises(RuntimeError, match="connection lost"):
        write_checkpoint(tmp_path / "cp.json")
    assert os.listdir(tmp_path) == []


def test_a_projection_that_disagrees_with_its_log_is_checkpointed_as_the_log_says(clinic, tmp_path):
    """The checkpoint records the log, never a projection edited behind its back: a head
    replaced by an older row's hash, and a projection ahead of a truncated log."""
    seen, job = reload(clinic["seen"]), reload(clinic["job"])
    rows = {r.sequence: r.hash for r in store.load_stream(seen.pk, "default")}
    raw_update(Encounter, seen.pk, head_hash=rows[1])  # version still 3
    delete_rows(job, 2)  # projection still at version 2

    code, out, err = run_command("checkpoint_encounters", "--output", str(tmp_path / "cp.json"))

    assert code == 0
    assert f"warning: encounter {seen.pk} sequence 3: head:" in err
    assert f"warning: encounter {job.pk} sequence 2: truncated:" in err
    entries = {e["id"]: e for e in json.loads((tmp_path / "cp.json").read_text())["encounters"]}
    assert (entries[str(seen.pk)]["version"], entries[str(seen.pk)]["head_hash"]) == (3, rows[3])
    job_row_1 = EncounterTransition.objects.get(encounter_id=job.pk, sequence=1).hash
    assert (entries[str(job.pk)]["version"], entries[str(job.pk)]["head_hash"]) == (1, job_row_1)


# ---------------------------------------------------------------------------------------------
# Auditing against a checkpoint
# ---------------------------------------------------------------------------------------------


def test_an_intact_log_extends_its_checkpoint(clinic, checkpoint, visit_definition, patient):
    # Streams move on and new encounters appear: still extending the checkpoint.
    transition(clinic["fresh"], "checked_in")
    transition(clinic["job"], "working")
    create_encounter(visit_definition, patient)

    code, data, err = against(checkpoint)

    assert (code, err) == (0, "")
    assert found(data) == []
    root = json.loads(checkpoint.read_text())["root"]
    assert data["checkpoint"] == {
        "file": str(checkpoint),
        "format": CHECKPOINT_FORMAT,
        "created_at": json.loads(checkpoint.read_text())["created_at"],
        "created_at_covered": True,
        "definition": None,
        "root": root,
        "signature": None,
        "entries": 4,
        "checked": 4,
        "tolerance_seconds": 300.0,
    }
    code, out, _ = run_command("audit_encounters", "--against", str(checkpoint))
    assert code == 0
    assert out.startswith(
        "Seals: not checked (ENCOUNTERS_SEAL_KEYS is not set)\n"
        f"Against checkpoint {checkpoint} ({CHECKPOINT_FORMAT}) of "
    )
    assert "(not covered by the root)" not in out
    assert (
        f"root {root}, unsigned: 4 of its 4 encounter(s) compared with the log, 0 finding(s)" in out
    )


def test_a_fully_recomputed_chain_is_caught(clinic, checkpoint):
    """The attack the chain cannot see: rewrite row 2's reason, recompute rows 2 and 3 and the
    projection. The plain audit and the rebuild check are clean; the checkpoint is not."""
    seen = clinic["seen"]
    rewrite_row(seen, 2, reason="nothing to see here")
    rehash_from(seen, 2)
    forge_projection(seen)
    assert plain_audit_is_clean()

    code, data, err = against(checkpoint)

    assert code == 1
    assert "1 anomaly found" in err
    assert found(data) == [(str(seen.pk), 3, "rewritten")]
    (anomaly,) = [a for e in data["encounters"] for a in e["anomalies"]]
    assert "row 3 has the hash" in anomaly["detail"]
    assert data["anomaly_count"] == 1


def test_a_rewritten_genesis_is_caught_with_or_without_rows(clinic, checkpoint):
    """Move the creation a day back and recompute the genesis hash (and, with rows, the whole
    chain and the projection): clean to the chain, caught by the checkpoint — at version 0
    for a fresh encounter, at its head for one with rows."""
    for encounter in (clinic["fresh"], clinic["job"]):
        fresh = reload(encounter)
        moved = fresh.created_at - timedelta(days=1)
        forged = genesis_hash(
            dataclasses.replace(fresh.genesis(), created_at=moved), version_hash_of(fresh)
        )
        raw_update(Encounter, fresh.pk, created_at=moved, genesis_hash=forged)
        if fresh.version:
            rehash_from(fresh, 1)
        forge_projection(fresh)
    assert plain_audit_is_clean()

    code, data, _ = against(checkpoint)

    assert code == 1
    assert sorted(found(data)) == sorted(
        [(str(clinic["fresh"].pk), 0, "rewritten"), (str(clinic["job"].pk), 2, "rewritten")]
    )


def test_a_truncated_stream_with_its_projection_put_back_is_caught(clinic, checkpoint):
    seen = clinic["seen"]
    delete_rows(seen, 3, 2)
    forge_projection(seen)  # version 1, head = row 1: consistent with what is left
    assert plain_audit_is_clean()

    code, data, _ = against(checkpoint)

    assert code == 1
    assert found(data) == [(str(seen.pk), 3, "truncated")]
    (anomaly,) = [a for e in data["encounters"] for a in e["anomalies"]]
    assert "the log ends at row 1" in anomaly["detail"]


def test_a_replaced_last_row_is_caught(clinic, checkpoint):
    """Delete the last row, put the projection back, then let the application append a new
    row 3: the stream is back at the checkpointed version, with another row."""
    seen = clinic["seen"]
    delete_rows(seen, 3)
    forge_projection(seen)
    transition(reload(seen), "cancelled", reason="never completed")
    assert plain_audit_is_clean()

    code, data, _ = against(checkpoint)

    assert code == 1
    assert found(data) == [(str(seen.pk), 3, "rewritten")]


def test_a_deleted_encounter_is_missing(clinic, checkpoint):
    delete_encounter(clinic["gone"])
    delete_encounter(clinic["fresh"])
    assert plain_audit_is_clean()

    code, data, _ = against(checkpoint)

    assert code == 1
    missing = sorted(str(clinic[name].pk) for name in ("gone", "fresh"))
    assert sorted(found(data)) == [(pk, 0, "missing") for pk in missing]
    reported = [e for e in data["encounters"] if e.get("missing")]
    assert sorted(e["id"] for e in reported) == missing
    assert all(
        (e["definition"], e["state_as_of"], e["timeline"]) == (None, None, []) for e in reported
    )
    assert data["encounters"][-2:] == sorted(reported, key=lambda e: e["id"])  # after the others
    code, out, _ = run_command("audit_encounters", "--against", str(checkpoint))
    assert f"Encounter {missing[0]}  (missing: in the checkpoint, not in the database)" in out
    assert "sequence 0: missing: the encounter is gone" in out


def test_a_row_gone_from_the_middle_is_rewritten(clinic, checkpoint):
    """Checkpointed at version 2, then row 2 deleted while row 3 stays."""
    job = clinic["job"]
    transition(job, "working")
    delete_rows(job, 2)

    code, data, _ = against(checkpoint)

    assert code == 1
    assert (str(job.pk), 2, "rewritten") in found(data)
    assert (str(job.pk), 3, "gap") in found(data)  # the chain says so too


def test_the_selection_picks_the_timelines_but_the_checkpoint_is_compared_whole(clinic, checkpoint):
    """A selection cannot leave an encounter of the checkpoint out: the findings of the ones
    outside it are reported after the selected ones, marked, then the missing ones."""
    seen, job = clinic["seen"], clinic["job"]
    rewrite_row(seen, 3, reason="forged")
    rehash_from(seen, 3)
    forge_projection(seen)
    rewrite_row(job, 2, reason="forged")
    rehash_from(job, 2)
    forge_projection(job)
    delete_encounter(clinic["gone"])
    everything = sorted(
        [
            (str(job.pk), 2, "rewritten"),
            (str(seen.pk), 3, "rewritten"),
            (str(clinic["gone"].pk), 0, "missing"),
        ]
    )

    code, data, _ = against(checkpoint, "--definition", "EMPLOYMENT")
    assert code == 1 and sorted(found(data)) == everything
    assert [(e["id"], e.get("outside_selection", False)) for e in data["encounters"]] == [
        (str(job.pk), False),
        (str(seen.pk), True),
        (str(clinic["gone"].pk), False),
    ]
    assert data["encounters"][1]["timeline"] != []  # audited in full
    assert data["checkpoint"]["checked"] == 3
    code, data, _ = against(checkpoint, "--encounter", str(seen.pk))
    assert sorted(found(data)) == everything
    assert data["encounters"][0]["id"] == str(seen.pk)
    code, out, _ = run_command(
        "audit_encounters", "--against", str(checkpoint), "--encounter", str(seen.pk)
    )
    assert f"Encounter {job.pk}  [EMPLOYMENT] (outside the selection: " in out
    # An id that is gone but in the checkpoint is reported missing, not refused.
    code, data, err = against(checkpoint, "--encounter", str(clinic["gone"].pk))
    assert code == 1
    assert (str(clinic["gone"].pk), 0, "missing") in found(data)
    code, out, err = run_command("audit_encounters", "--encounter", str(clinic["gone"].pk))
    assert code == 2 and out == ""
    assert f"--encounter {clinic['gone'].pk}: no encounter has this id" in err


def test_the_api_beside_the_command(clinic, checkpoint):
    seen = clinic["seen"]
    rewrite_row(seen, 1, reason="forged")
    rehash_from(seen, 1)
    forge_projection(seen)

    check = verify_checkpoint(checkpoint)
    assert [(a.encounter_id, a.sequence, a.kind) for a in check.anomalies] == [
        (seen.pk, 3, "rewritten")
    ]
    assert (check.format, check.covers_created_at, check.signed_by) == (
        CHECKPOINT_FORMAT,
        True,
        None,
    )
    assert (check.count, check.checked, check.definition) == (4, 4, None)
    data = json.loads(checkpoint.read_text())
    assert check.root == data["root"] and check.path == str(checkpoint)
    from_data = verify_checkpoint(data)  # the parsed JSON works as well
    assert (from_data.anomalies, from_data.path) == (check.anomalies, None)
    report = audit_encounters(against=str(checkpoint))
    assert report.anomaly_count == 1 and report.checkpoint.root == data["root"]
    stream = iter_audit(against=checkpoint, encounters=[clinic["job"].pk])
    assert stream.checkpoint.checked == 4
    assert [(a.id, a.outside_selection, a.anomalies) for a in stream] == [
        (clinic["job"].pk, False, []),
        (seen.pk, True, check.anomalies),
    ]
    description, entries = read_checkpoint(checkpoint)
    assert [str(e.id) for e in entries] == [e["id"] for e in data["encounters"]]
    assert description.created_at.isoformat() == data["created_at"]


def test_the_published_root_must_match(checkpoint):
    root = json.loads(checkpoint.read_text())["root"]
    assert against(checkpoint, "--root", root.upper())[0] == 0
    other = "0" * 64
    code, data, err = against(checkpoint, "--root", other)
    assert code == 2 and data == {}
    assert f"checkpoint {checkpoint}: its root {root} is not the published root {other}" in err
    code, _, err = run_command("audit_encounters", "--root", root)
    assert code == 2 and "--root is the published root of a checkpoint: give --against" in err


def test_a_regenerated_checkpoint_is_refused_by_the_published_root(clinic, checkpoint, tmp_path):
    """An attacker who can also replace the file rewrites the log and writes a new checkpoint
    of the forged log: it is self-consistent, but not the checkpoint whose root was published."""
    published = json.loads(checkpoint.read_text())["root"]
    seen = clinic["seen"]
    rewrite_row(seen, 2, reason="forged")
    rehash_from(seen, 2)
    forge_projection(seen)
    checkpoint.unlink()
    write_checkpoint(checkpoint)

    assert against(checkpoint)[0] == 0  # consistent with the forged log
    code, _, err = against(checkpoint, "--root", published)
    assert code == 2 and "is not the published root" in err


# ---------------------------------------------------------------------------------------------
# Files that cannot be used: exit 2, nothing written, the file named
# ---------------------------------------------------------------------------------------------


def _edit(data: dict, change: Any) -> dict:
    change(data)
    return data


def _rehashed(data: dict) -> dict:
    """Keep the root consistent with edited entries (to reach the checks behind it)."""
    data["root"] = root_digest(
        (CheckpointEntry(UUID(e["id"]), e["version"], e["head_hash"]) for e in data["encounters"]),
        created_at=data["created_at"],
        definition=data["definition"],
    )
    data["count"] = len(data["encounters"])
    return data


def _swap_first_two(data: dict) -> None:
    data["encounters"][:2] = data["encounters"][1::-1]


MALFORMED = {
    "not JSON": (lambda text, data: "this is not json", "not a valid checkpoint"),
    "empty": (lambda text, data: "", "expected '{', found 'the end of the file'"),
    "cut short": (lambda text, data: text[: len(text) // 2], "not a valid checkpoint"),
    "an array": (lambda text, data: "[]", "expected '{', found '['"),
    "trailing text": (lambda text, data: text + "{}", "text after the checkpoint object"),
    "another format": (
        lambda text, data: json.dumps(_edit(data, lambda d: d.update(format="other/1"))),
        "not a django-encounters checkpoint (format 'other/1'",
    ),
    "no format": (
        lambda text, data: json.dumps(_edit(data, lambda d: d.pop("format"))),
        "format missing",
    ),
    "an edited version": (
        lambda text, data: json.dumps(
            _edit(
                data, lambda d: d["encounters"][0].update(version=d["encounters"][0]["version"] + 1)
            )
        ),
        "does not match its fields",
    ),
    "a dropped entry": (
        lambda text, data: json.dumps(_edit(data, lambda d: d["encounters"].pop())),
        "count 4 does not match its 3 entries",
    ),
    "a dropped entry, recounted": (
        lambda text, data: json.dumps(
            _edit(data, lambda d: (d["encounters"].pop(), d.update(count=3)))
        ),
        "does not match its fields",
    ),
    "entries out of order": (
        lambda text, data: json.dumps(_rehashed(_edit(data, _swap_first_two))),
        "(ascending ids)",
    ),
    "a duplicate id": (
        lambda text, data: json.dumps(
            _rehashed(_edit(data, lambda d: d["encounters"].insert(1, d["encounters"][0])))
        ),
        "(ascending ids)",
    ),
    "an upper-case id": (
        lambda text, data: json.dumps(
            _rehashed(
                _edit(
                    data, lambda d: d["encounters"][0].update(id=d["encounters"][0]["id"].upper())
                )
            )
        ),
        "is not a lower-case hyphenated UUID",
    ),
    "a boolean version": (
        lambda text, data: json.dumps(
            _edit(data, lambda d: d["encounters"][0].update(version=True))
        ),
        "version True is not a non-negative integer",
    ),
    "a head with a space": (
        lambda text, data: json.dumps(
            _edit(data, lambda d: d["encounters"][0].update(head_hash="v2:a b"))
        ),
        "is not a stored hash",
    ),
    "an extra key": (
        lambda text, data: json.dumps(_edit(data, lambda d: d.update(note="hi"))),
        "unexpected key 'note'",
    ),
    "an extra entry key": (
        lambda text, data: json.dumps(_edit(data, lambda d: d["encounters"][0].update(x=1))),
        "must be an object with id, version and head_hash",
    ),
    "a duplicate key": (
        lambda text, data: text.replace('"count":', '"root": "x", "count":'),
        "appears twice",
    ),
    "NaN": (
        lambda text, data: text.replace('"version": 0', '"version": NaN'),
        "NaN is not JSON",
    ),
    "a naive created_at": (
        lambda text, data: json.dumps(
            _edit(data, lambda d: d.update(created_at=d["created_at"][:19]))
        ),
        "is not an ISO-8601 time with offset",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_exits_2_naming_the_file(checkpoint, case):
    text = checkpoint.read_text(encoding="utf-8")
    change, message = MALFORMED[case]
    checkpoint.write_text(change(text, json.loads(text)), encoding="utf-8")

    for fmt in ("table", "json", "csv"):
        code, out, err = run_command(
            "audit_encounters", "--against", str(checkpoint), "--format", fmt
        )
        assert code == 2, (case, err)
        assert out == ""  # refused before anything is written
        assert f"CommandError: checkpoint {checkpoint}: " in err
        assert message in err, (case, err)
    with pytest.raises(CheckpointError) as refused:
        verify_checkpoint(checkpoint)
    assert refused.value.path == str(checkpoint)


def test_unreadable_checkpoints_exit_2(checkpoint, tmp_path):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"format": "\xff\xfe"}')
    cases = {
        binary: "not UTF-8 text",
        tmp_path / "absent.json": "cannot read: No such file or directory",
        tmp_path: "cannot read",
    }
    for path, message in cases.items():
        code, out, err = run_command("audit_encounters", "--against", str(path))
        assert code == 2 and out == ""
        assert f"checkpoint {path}: {message}" in err


def test_the_reader_streams_across_chunk_boundaries(checkpoint, monkeypatch):
    """The file is read in chunks; whatever their size, it reads as json.load does."""
    data = json.loads(checkpoint.read_text(encoding="utf-8"))
    expected = [(e["id"], e["version"], e["head_hash"]) for e in data["encounters"]]
    for chunk in (1, 2, 3, 7, 64):
        monkeypatch.setattr(checkpoint_reading._Reader, "CHUNK", chunk)
        description, entries = read_checkpoint(checkpoint)
        assert [(str(e.id), e.version, e.head_hash) for e in entries] == expected
        assert description.root == data["root"]
        assert verify_checkpoint(checkpoint).anomalies == []


def test_a_large_checkpoint_is_verified_in_batches(tmp_path, encounter):
    """3,000 entries (several read chunks, several batches): the ones that do not exist are
    missing, the one that does is compared."""
    fresh = reload(encounter)
    entries = sorted(
        [CheckpointEntry(uuid4(), 7, "v2:" + "a" * 64) for _ in range(2999)]
        + [CheckpointEntry(fresh.pk, 0, fresh.genesis_hash)],
        key=lambda e: str(e.id),
    )
    path = tmp_path / "large.json"
    path.write_text(
        json.dumps(
            {
                "format": CHECKPOINT_FORMAT,
                "created_at": "2026-01-01T00:00:00+00:00",
                "definition": None,
                "encounters": [e.as_dict() for e in entries],
                "count": len(entries),
                "root": root_digest(entries, created_at="2026-01-01T00:00:00+00:00"),
                "signature": None,
            },
            indent=1,
        )
    )
    assert path.stat().st_size > 3 * checkpoint_reading._Reader.CHUNK

    check = verify_checkpoint(path, batch_size=250)

    assert check.checked == 1
    assert len(check.anomalies) == 2999
    assert {a.kind for a in check.anomalies} == {"missing"}
    assert fresh.pk not in {a.encounter_id for a in check.anomalies}
