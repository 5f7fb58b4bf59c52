"""Human labels in and out of the ledger as JSONL (`prefloop label import|export`).

A line of an import file is one JSON object in either form:

    {"comparison_id": 12, "choice": "a", "annotator": "alice"}            # a comparison of the
                                                                          # campaign
    {"prompt": "...", "response_a": "...", "response_b": "...",           # a pair from anywhere:
     "choice": "tie", "annotator": "alice"}                               # created, then labeled

Both accept `strength` (a finite number or null); the pair form also `policy_version_a/_b`
(default 0), `labeler_kind` (only "human") and `provenance` (ignored), so that an export file
imports as it is. Every line is validated before anything is written; a file with a bad line
imports nothing unless `skip_bad`. What a file writes (each pair's prompt, generations and
comparison, and every label) is one ledger transaction, so a label the ledger refuses leaves no
new row behind. Imports are idempotent: a pair's generations are keyed by their text (worker
`label-import`, sample index from the text's sha256), so a second import of the same file
finds every row and adds none.

An export line is the pair form plus `labeler_kind` and `provenance` (campaign and ledger ids).
Importing it into the campaign it came from creates new comparisons with the same texts (the
ledger cannot look generations up by text): export moves labels between ledgers and tools.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from actors.label_schemas import (
    STRICT,
    AnnotatorName,
    Choice,
    ImportedLabel,
    validation_problems,
)
from storage.errors import LedgerError, UnknownId
from storage.ledger import Ledger
from storage.records import NewPairPreference, NewPreference, NewResponse

WORKER = "label-import"
SAMPLING = {"source": WORKER, "token_count": "whitespace words"}
MAX_REPORTED = 50
Text = Annotated[str, Field(min_length=1)]
Version = Annotated[int, Field(ge=0, le=2**31 - 1)]
Id = Annotated[int, Field(ge=0)]


class LabelFileError(ValueError):
    """A label file that cannot be read or imported, or a missing choice (which campaign)."""


class Provenance(BaseModel):
    """Where an exported label came from (ids are local to the exporting ledger)."""

    model_config = STRICT
    campaign: str
    preference_id: Id
    comparison_id: Id
    prompt_id: Id
    generation_a_id: Id
    generation_b_id: Id


class PairLabel(BaseModel):
    """A human label of a pair of texts (the export format, provenance optional)."""

    model_config = STRICT
    prompt: Text
    response_a: Text
    response_b: Text
    choice: Choice
    annotator: AnnotatorName
    strength: Annotated[float, Field(ge=-1e6, le=1e6)] | None = None
    policy_version_a: Version = 0
    policy_version_b: Version = 0
    labeler_kind: Literal["human"] = "human"
    provenance: Provenance | None = None

    @model_validator(mode="after")
    def _two_responses(self) -> PairLabel:
        if self.response_a == self.response_b:
            raise ValueError("response_a and response_b are the same text: nothing to compare")
        return self


@dataclass(frozen=True)
class Line:
    """A valid line: its 1-based number and its label."""

    number: int
    label: PairLabel | ImportedLabel


@dataclass(frozen=True)
class BadLine:
    """A line that cannot be imported, and why."""

    number: int
    problem: str


@dataclass(frozen=True)
class Parsed:
    """An import file read and validated: the good lines and the bad ones."""

    lines: list[Line]
    bad: list[BadLine]


class ImportRefused(LabelFileError):
    """Bad lines in a file imported without ``skip_bad``: nothing was imported."""

    def __init__(self, bad: list[BadLine]) -> None:
        super().__init__(f"{len(bad)} bad line(s); nothing imported")
        self.bad = bad


@dataclass(frozen=True)
class Imported:
    """What an import wrote: new labels, labels already in the ledger, lines skipped."""

    created: int
    existing: int
    skipped: list[BadLine]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_line(text: str, max_chars: int) -> PairLabel | ImportedLabel:
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise LabelFileError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise LabelFileError(f"expected a JSON object; got a {type(obj).__name__}")
    model = ImportedLabel if "comparison_id" in obj else PairLabel
    try:
        label = model.model_validate(obj)
    except ValidationError as exc:
        problems = validation_problems(exc, whole="")
        raise LabelFileError("; ".join(f"{f}: {m}" if f else m for f, m in problems)) from None
    if isinstance(label, PairLabel):
        for field in ("prompt", "response_a", "response_b"):
            size = len(getattr(label, field))
            if size > max_chars:
                raise LabelFileError(f"{field}: {size} characters; the ledger accepts at most "
                                     f"{max_chars} (storage.max_text_chars)")
    return label


def _identity(label: PairLabel | ImportedLabel) -> tuple[Any, ...]:
    if isinstance(label, ImportedLabel):
        return ("comparison", label.comparison_id, label.annotator)
    return ("pair", label.prompt, label.response_a, label.policy_version_a, label.response_b,
            label.policy_version_b, label.annotator)


def read_labels(path: Path, max_chars: int) -> Parsed:
    """Validate every line of ``path`` (blank lines are ignored).

    A second line for the same comparison (or pair) and annotator with another choice or
    strength is bad: a file holds one label per annotator and comparison.
    """
    lines: list[Line] = []
    bad: list[BadLine] = []
    first: dict[tuple[Any, ...], Line] = {}
    try:
        with path.open(encoding="utf-8") as fh:
            for number, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    label = _parse_line(text, max_chars)
                except LabelFileError as exc:
                    bad.append(BadLine(number, str(exc)))
                    continue
                earlier = first.setdefault(_identity(label), Line(number, label))
                same = (earlier.label.choice, earlier.label.strength) == (label.choice,
                                                                          label.strength)
                if earlier.number != number and not same:
                    bad.append(BadLine(number, f"annotator {label.annotator!r} labeled this "
                                       f"comparison differently on line {earlier.number}"))
                    continue
                lines.append(Line(number, label))
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"{path}: cannot read it ({exc})") from None
    return Parsed(lines, bad)


# -- writing ---------------------------------------------------------------------------------


def text_index(text: str) -> int:
    """The sample index of an imported response: 31 bits of its sha256 (same text, same row)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) & 0x7FFF_FFFF


class _LineFailed(Exception):
    def __init__(self, number: int, problem: str) -> None:
        super().__init__(problem)
        self.number, self.problem = number, problem


_BATCH_INDEX = re.compile(r"\b(prompts|generations|comparisons|preferences)\[(\d+)\]")


def _blame(exc: LedgerError, pairs: Sequence[Line], lines: Sequence[Line]) -> _LineFailed:
    """The line a ledger refusal is about (its message names a batch index)."""
    found = _BATCH_INDEX.search(str(exc))
    if found is None:
        raise LabelFileError(f"the ledger refused the import: {exc}") from None
    kind, index = found[1], int(found[2])
    batch = lines if kind == "preferences" else pairs
    line = batch[index // 2 if kind == "generations" else index]
    return _LineFailed(line.number, re.sub(r"^\w+\[\d+\]: ", "", str(exc)))


def _item(label: PairLabel | ImportedLabel) -> NewPreference | NewPairPreference:
    """The ledger's form of a line: a preference of a comparison, or of a pair of texts."""
    if isinstance(label, ImportedLabel):
        return NewPreference(label.comparison_id, label.choice, "human", label.annotator,
                             label.strength)
    responses = [
        NewResponse(text, len(text.split()), version, WORKER, text_index(text), SAMPLING)
        for text, version in ((label.response_a, label.policy_version_a),
                              (label.response_b, label.policy_version_b))
    ]
    return NewPairPreference(label.prompt, *responses, label.choice, "human", label.annotator,
                             label.strength, selection=WORKER)


def _write_once(ledger: Ledger, campaign: str, lines: Sequence[Line]) -> list[bool]:
    """Record ``lines`` in one transaction (a pair's prompt, generations and comparison too, so
    a refusal leaves nothing behind); created flags in line order."""
    pairs = [line for line in lines if isinstance(line.label, PairLabel)]
    items = [_item(line.label) for line in lines]
    try:
        return [r.created for r in ledger.record_pair_preferences(campaign, items, WORKER)]
    except LedgerError as exc:
        raise _blame(exc, pairs, lines) from None


def import_labels(ledger: Ledger, campaign: str, parsed: Parsed, skip_bad: bool) -> Imported:
    """Write the good lines as human preferences, all in one transaction.

    With ``skip_bad``, bad lines (and lines the ledger refuses) are left out; without it, any
    bad line raises and no preference is written.

    Raises:
        ImportRefused: bad lines, without ``skip_bad``.
        LabelFileError: a ledger refusal that names no line.
    """
    skipped = list(parsed.bad)
    if skipped and not skip_bad:
        raise ImportRefused(skipped)
    lines = list(parsed.lines)
    while lines:
        try:
            created = _write_once(ledger, campaign, lines)
            return Imported(sum(created), len(created) - sum(created), sorted(
                skipped, key=lambda b: b.number))
        except _LineFailed as failed:
            skipped.append(BadLine(failed.number, failed.problem))
            if not skip_bad:
                raise ImportRefused(skipped) from None
            lines = [line for line in lines if line.number != failed.number]
    return Imported(0, 0, sorted(skipped, key=lambda b: b.number))


# -- export ----------------------------------------------------------------------------------


def export_labels(ledger: Ledger, campaign: str, kinds: Sequence[str], out: IO[str]) -> int:
    """Write the campaign's effective preferences of ``kinds`` as JSONL; returns how many."""
    snap = ledger.snapshot(campaign, kinds=tuple(kinds))
    for row in snap.rows:
        line = {
            "prompt": row.prompt,
            "response_a": row.text_a,
            "response_b": row.text_b,
            "choice": row.choice,
            "annotator": row.labeler_id,
            "strength": row.strength,
            "policy_version_a": row.policy_version_a,
            "policy_version_b": row.policy_version_b,
            "labeler_kind": row.labeler_kind,
            "provenance": {
                "campaign": campaign,
                "preference_id": row.preference_id,
                "comparison_id": row.comparison_id,
                "prompt_id": row.prompt_id,
                "generation_a_id": row.generation_a_id,
                "generation_b_id": row.generation_b_id,
            },
        }
        out.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")
    return len(snap.rows)


def export_to_file(ledger: Ledger, campaign: str, kinds: Sequence[str], path: Path) -> int:
    """`export_labels` into ``path``, written to a temporary file and renamed when complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            count = export_labels(ledger, campaign, kinds, fh)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def ensure_campaign(ledger: Ledger, name: str) -> bool:
    """Create the campaign when missing; True when it was created."""
    try:
        ledger.get_campaign(name)
        return False
    except UnknownId:
        ledger.ensure_campaign(name)
        return True


def campaign_name(campaign: str | None, run_dir: Path | None) -> str:
    """``campaign``, else `campaign.name` from the run directory's pinned config.yaml."""
    if campaign:
        return campaign
    config = run_dir / "config.yaml" if run_dir is not None else None
    if config is None or not config.is_file():
        raise LabelFileError("which campaign? pass --campaign NAME (or --run-dir of a run, "
                             "whose config.yaml names it)")
    import yaml

    name = ((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("campaign") or {})
    if not isinstance(name, dict) or not isinstance(name.get("name"), str):
        raise LabelFileError(f"{config}: no campaign.name; pass --campaign NAME")
    return name["name"]
