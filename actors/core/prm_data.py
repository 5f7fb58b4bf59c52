"""Step-labelled solutions for process reward models: PRMBench and raw PRM800K loaders.

A `StepExample` is one question, its solution cut into steps, and one label per step
(1 = the step is correct, 0 = the step is wrong).

* PRMBench (`prmbench/*/*.jsonl`, one JSON record per line): the `modified_process` with
  `error_steps` (1-based) labelled 0 and every other step 1, asked with `modified_question`
  (the `missing_condition` edits may change the question); optionally also the
  `original_process`, all steps 1, asked with `original_question`.
* PRM800K (raw `label.steps[].completions[].rating` records; a file holds one JSON value,
  several concatenated pretty-printed values, or JSON lines): the path of chosen completions,
  see `load_prm800k`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PRMDataError(ValueError):
    """A record that does not have the expected fields (names the file and 1-based line)."""


@dataclass(frozen=True)
class StepExample:
    """One solution with a label per step.

    Attributes:
        question: The problem statement.
        steps: `S` step texts, in order.
        labels: `S` labels, 1 = correct step, 0 = wrong step.
    """

    question: str
    steps: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.labels):
            raise ValueError(f"{len(self.steps)} steps but {len(self.labels)} labels")
        if any(label not in (0, 1) for label in self.labels):
            raise ValueError(f"labels must be 0 or 1, got {self.labels}")


def _jsonl_files(path_or_dir: str | Path) -> list[Path]:
    path = Path(path_or_dir)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no .jsonl file(s) there")
    return files


def _field(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind):
        raise PRMDataError(f"{where}: expected field {key!r} of type {kind.__name__}, "
                           f"got {type(value).__name__}")
    return value


def _prmbench_record(record: dict[str, Any], where: str, include_original: bool,
                     strict: bool) -> list[StepExample]:
    modified = tuple(_field(record, "modified_process", list, where))
    errors = _field(record, "error_steps", list, where)
    out: list[StepExample] = []
    if errors and all(isinstance(e, int) and 1 <= e <= len(modified) for e in errors):
        wrong = set(errors)
        labels = tuple(0 if i + 1 in wrong else 1 for i in range(len(modified)))
        out.append(StepExample(_field(record, "modified_question", str, where), modified, labels))
    elif strict:
        raise PRMDataError(f"{where}: expected field 'error_steps' to hold 1-based indices in "
                           f"1..{len(modified)} (len of 'modified_process'), got {errors}")
    if include_original:
        original = tuple(_field(record, "original_process", list, where))
        out.append(StepExample(_field(record, "original_question", str, where), original,
                               (1,) * len(original)))
    return out


def load_prmbench(path_or_dir: str | Path, include_original: bool = True,
                  limit: int | None = None, strict: bool = False) -> list[StepExample]:
    """Load PRMBench JSONL records as step examples.

    Each record yields its modified process (labels from `error_steps`) and, with
    `include_original`, then its original process (all labels 1). Some real records (57 of 3203
    in `train/`, 21 of 718 in `holdout/`) name an error step past the end of
    `modified_process`; their wrong step cannot be placed, so their modified process is skipped
    (the original is still kept), or, with `strict`, they raise.

    Args:
        path_or_dir: One `.jsonl` file, or a directory whose `*.jsonl` files are read in name
            order.
        include_original: Also yield each record's original (all-correct) process.
        limit: Stop after this many examples (not records).
        strict: Raise on an out-of-range `error_steps` instead of skipping.

    Returns:
        The examples, in file then line order.

    Raises:
        PRMDataError: A line that is not JSON or lacks a field; names file, line and field.
    """
    examples: list[StepExample] = []
    for file in _jsonl_files(path_or_dir):
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PRMDataError(f"{where}: not a JSON record ({err})") from err
                if not isinstance(record, dict):
                    raise PRMDataError(f"{where}: expected a JSON object")
                examples.extend(_prmbench_record(record, where, include_original, strict))
                if limit is not None and len(examples) >= limit:
                    return examples[:limit]
    return examples


def _json_values(text: str) -> Iterator[tuple[int, Any]]:
    """`(1-based line, value)` for each JSON value in `text` (concatenated or one per line)."""
    decoder = json.JSONDecoder()
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return
        line = text.count("\n", 0, index) + 1
        value, index = decoder.raw_decode(text, index)
        yield line, value


def _rating_label(rating: int, neutral: int) -> int:
    return {1: 1, -1: 0, 0: neutral}[rating]


def _prm800k_record(record: Any, where: str, neutral: int) -> StepExample:
    if not isinstance(record, dict):
        raise PRMDataError(f"{where}: expected a JSON object")
    question = _field(_field(record, "question", dict, where), "problem", str, where)
    steps, labels = [], []
    for k, step in enumerate(_field(_field(record, "label", dict, where), "steps", list, where)):
        at = f"{where} (label.steps[{k}])"
        completions = _field(step, "completions", list, at)
        chosen, human = step.get("chosen_completion"), step.get("human_completion")
        if isinstance(chosen, int):
            picked = completions[chosen]
            steps.append(_field(picked, "text", str, at))
            labels.append(_rating_label(_field(picked, "rating", int, at), neutral))
        elif isinstance(human, dict):  # every model step was rejected; the labeler wrote one
            steps.append(_field(human, "text", str, at))
            labels.append(1)
        else:  # the labeler stopped here: keep the first rated alternative, then end
            rated = [c for c in completions if isinstance(c.get("rating"), int)]
            if rated:
                steps.append(_field(rated[0], "text", str, at))
                labels.append(_rating_label(rated[0]["rating"], neutral))
            break
    return StepExample(question, tuple(steps), tuple(labels))


def load_prm800k(path: str | Path, neutral_label: int = 1) -> list[StepExample]:
    """Load raw PRM800K records, following the chosen-completion path.

    Step by step:

    * `chosen_completion` is an index: take that completion; rating 1 → label 1, -1 → 0,
      0 (neutral: "reasonable but not progress") → `neutral_label` (default 1, since a neutral
      step is not an error).
    * no chosen completion but a `human_completion` (phase 1: the labeler rejected every model
      step and wrote one): take the human step, label 1 (it has no rating), and go on.
    * neither: the labeler stopped (phase 2 `found_error`, or `give_up`). Take the first
      completion that has a rating (in phase 2 that is the pre-generated step found wrong) as the
      last step, and end the path; if none is rated, end the path without it.

    Args:
        path: A `.json` or `.jsonl` file of records (one or several JSON values).
        neutral_label: Label of a rating-0 step, 0 or 1.

    Returns:
        One example per record, in file order.

    Raises:
        PRMDataError: A record that is not JSON or lacks a field; names file, line and field.
    """
    if neutral_label not in (0, 1):
        raise ValueError(f"neutral_label must be 0 or 1, got {neutral_label}")
    file = Path(path)
    text = file.read_text(encoding="utf-8")
    examples = []
    values = _json_values(text)
    line = 1
    while True:
        try:
            line, record = next(values)
        except StopIteration:
            return examples
        except json.JSONDecodeError as err:
            raise PRMDataError(f"{file}:{err.lineno}: not a JSON record ({err.msg})") from err
        examples.append(_prm800k_record(record, f"{file}:{line}", neutral_label))
