"""Anthropic HH-RLHF transcripts → prompt / chosen / rejected preference pairs.

An HH record holds two whole transcripts, ``chosen`` and ``rejected``, that share every turn but
the last Assistant reply::

    "\\n\\nHuman: hi\\n\\nAssistant: hello!"       (chosen)
    "\\n\\nHuman: hi\\n\\nAssistant: go away"      (rejected)

The prompt is the shared transcript up to and including the last ``\\n\\nAssistant:`` marker that
both transcripts contain, and each response is the text after it, stripped.

>>> pair = split_transcripts("\\n\\nHuman: hi\\n\\nAssistant: hello!",
...                          "\\n\\nHuman: hi\\n\\nAssistant: go away")
>>> pair.prompt, pair.chosen, pair.rejected
('\\n\\nHuman: hi\\n\\nAssistant:', 'hello!', 'go away')

Five of the 1,879 shipped training records break the "only the last reply differs" rule (a
reply that itself contains ``Human:``/``Assistant:`` text, or transcripts that diverge a turn
early). Splitting at the last marker *inside the common prefix* parses them too: the prompt is
then shorter and a response carries the extra turns, exactly as the two transcripts differ.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    """One human preference: ``chosen`` was preferred to ``rejected`` as a reply to ``prompt``.

    Attributes:
        prompt: The transcript up to and including the final ``\\n\\nAssistant:`` marker.
        chosen: The preferred reply (stripped).
        rejected: The other reply (stripped).
        margin: Label strength, used as the Bradley–Terry margin when margins are on (HH: 0).
        weight: Weight of the pair in the loss (e.g. human labels above AI labels).
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    weight: float = 1.0


def _common_prefix_length(a: str, b: str) -> int:
    shorter = min(len(a), len(b))
    return next((i for i in range(shorter) if a[i] != b[i]), shorter)


def split_transcripts(chosen: str, rejected: str) -> PreferencePair:
    """Split two full HH transcripts into their shared prompt and the two replies.

    Args:
        chosen: The preferred transcript.
        rejected: The other transcript.

    Returns:
        The pair, with the prompt ending at the last ``\\n\\nAssistant:`` marker that lies wholly
        inside the common prefix of both transcripts.

    Raises:
        ValueError: If a transcript has no Assistant turn, or the two share no Assistant turn.
    """
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if ASSISTANT not in text:
            raise ValueError(f"`{key}` has no {ASSISTANT!r} turn")
    common = _common_prefix_length(chosen, rejected)
    cut = chosen.rfind(ASSISTANT, 0, common)
    if cut < 0:
        raise ValueError(
            f"`chosen` and `rejected` must share the same prefix up to an {ASSISTANT!r} marker; "
            f"they differ at character {common}: {chosen[max(0, common - 20):common + 20]!r}")
    end = cut + len(ASSISTANT)
    return PreferencePair(prompt=chosen[:end], chosen=chosen[end:].strip(),
                          rejected=rejected[end:].strip())


def transcript_messages(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    """Turn an HH prompt (and optionally the reply) into chat messages for a chat template.

    A prompt without HH markers is one user message.

    >>> prompt = "\\n\\nHuman: hi\\n\\nAssistant: yo\\n\\nHuman: bye\\n\\nAssistant:"
    >>> [(m["role"], m["content"]) for m in transcript_messages(prompt, "ok")]
    [('user', 'hi'), ('assistant', 'yo'), ('user', 'bye'), ('assistant', 'ok')]
    """
    messages: list[dict[str, str]] = []
    role, rest = "user", prompt
    if not prompt.startswith((HUMAN, ASSISTANT)):
        messages.append({"role": "user", "content": prompt.strip()})
        rest = ""
    while rest:
        marker = HUMAN if rest.startswith(HUMAN) else ASSISTANT
        role = "user" if marker == HUMAN else "assistant"
        body = rest[len(marker):]
        nxt = [i for i in (body.find(HUMAN), body.find(ASSISTANT)) if i >= 0]
        stop = min(nxt) if nxt else len(body)
        if body[:stop].strip():
            messages.append({"role": role, "content": body[:stop].strip()})
        rest = body[stop:]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _parse_line(line: str) -> PreferencePair:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"expected a JSON object ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object with keys `chosen` and `rejected`, "
                         f"got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if not isinstance(row.get(k), str)]
    if missing:
        raise ValueError(f"expected string keys `chosen` and `rejected`; missing or not a "
                         f"string: {', '.join(f'`{k}`' for k in missing)}")
    return split_transcripts(row["chosen"], row["rejected"])


def iter_hh_jsonl(path: str | Path) -> Iterator[PreferencePair]:
    """Yield the pairs of an HH ``.jsonl`` or ``.jsonl.gz`` file, skipping blank lines.

    Raises:
        ValueError: For a bad line, naming the file, the 1-based line number and what was
            expected.
    """
    path = Path(path)
    with _open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield _parse_line(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from None


def load_hh_jsonl(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Read an HH preference file into a list of pairs.

    Args:
        path: A ``.jsonl`` or ``.jsonl.gz`` file with keys ``chosen`` and ``rejected``.
        limit: Keep only the first ``limit`` pairs (None: all).

    Returns:
        The pairs, in file order.
    """
    pairs = []
    for pair in iter_hh_jsonl(path):
        if limit is not None and len(pairs) >= limit:
            break
        pairs.append(pair)
    return pairs
