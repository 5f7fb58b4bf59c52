"""Public preference datasets → :class:`~actors.core.hh.PreferencePair` lists, one loader each.

Every format yields the same pair shape the reward model already consumes: ``prompt`` is an
HH-style transcript ending in ``\\n\\nAssistant:``, ``chosen``/``rejected`` are the bare replies,
and ``margin`` is the label strength (0 where the dataset gives none).

Formats (labeler kind; what a row holds → what a pair is):

- ``hh-rlhf`` (human): two whole transcripts, split by :func:`~actors.core.hh.split_transcripts`;
  margin 0.
- ``tldr`` (human; OpenAI summarize-from-feedback ``comparisons``): a post in ``info``, two
  ``summaries`` and the ``choice`` index; the prompt is the paper's ``SUBREDDIT/TITLE/POST …
  TL;DR:`` query as one Human turn; margin 0 (``extra.confidence`` is not used).
- ``helpsteer2`` (human): one prompt/response with five 0–4 attribute scores; every two
  responses to one prompt become a pair ranked by a weighted score, margin = score difference,
  equal scores skipped.
- ``ultrafeedback-binarized`` (ai: GPT-4 ratings): ``chosen``/``rejected`` chat lists that share
  all but the final assistant reply; margin = ``score_chosen − score_rejected``, ties skipped.

Rows are read with the HF ``datasets`` library: from a local JSON/JSONL(.gz)/Parquet file when a
path is given, else from the hub (which must be reachable; offline it fails at once, asking for a
file). A bad row raises ``ValueError`` naming the file, the 1-based row (the line of a JSONL file
without blank lines) and the field that was missing or invalid.

Example (the shipped HH file, from the project root)::

    loaded = load_preferences("hh-rlhf", path="../shared/data/hh-rlhf/train.jsonl.gz")
    len(loaded.pairs), loaded.labeler_kind, loaded.skipped  # (1879, 'human', 0)
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from actors.core.hh import ASSISTANT, HUMAN, PreferencePair, split_transcripts

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
HELPFULNESS_ONLY = {"helpfulness": 1.0}
"""Default HelpSteer2 weights: the paper's own preference construction (its DPO pairs) prefers
the response with the higher helpfulness score, which the annotators rated as overall quality."""
NEMOTRON_340B_WEIGHTS = {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46,
                         "complexity": 0.47, "verbosity": -0.33}
"""Weights of the Nemotron-4-340B reward model trained on HelpSteer2 (paper, appendix H)."""
LLAMA3_70B_WEIGHTS = {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45,
                      "complexity": 0.55, "verbosity": -0.4}
"""Weights of the Llama-3-70B SteerLM reward model trained on HelpSteer2 (appendix H)."""

_HELPSTEER_TURN = re.compile(r"<extra_id_1>(User|Assistant)\n?")


class HubUnavailableError(ConnectionError):
    """The Hugging Face hub cannot be reached; load from a local file instead."""


class RowError(ValueError):
    """A row lacks a field or holds an invalid one (the loader adds the file and row)."""


@dataclass(frozen=True)
class LoadedPairs:
    """Pairs read from one dataset.

    Attributes:
        pairs: The preference pairs, in file order.
        labeler_kind: ``human`` or ``ai``: who made the labels, as the dataset says.
        source: The format name (``hh-rlhf``, ``tldr``, ``helpsteer2``,
            ``ultrafeedback-binarized``).
        skipped: Rows or candidate pairs that carry no preference (equal scores).
        origin: The file read, or ``<hub id>:<split>``.
    """

    pairs: list[PreferencePair]
    labeler_kind: str
    source: str
    skipped: int
    origin: str


Rows = Iterable[tuple[int, Mapping[str, Any]]]
"""(1-based row number, row) in file order."""
Converter = Callable[[Rows, Mapping[str, float]], Iterator[PreferencePair | None]]
"""Turns rows into pairs; yields None for each skipped row or candidate pair."""


@dataclass(frozen=True)
class DatasetFormat:
    """How one public dataset is fetched and read.

    Attributes:
        labeler_kind: The ledger's labeler kind for these labels.
        hub_id: The dataset's id on the Hugging Face hub.
        hub_config: The hub config name (None: the default).
        hub_splits: Our split name → the hub's, where they differ (``train`` → ``train_prefs``).
        convert: The row converter.
    """

    labeler_kind: str
    hub_id: str
    hub_config: str | None
    hub_splits: Mapping[str, str]
    convert: Converter


# ---------------------------------------------------------------- field helpers


def _text(row: Mapping[str, Any], key: str, *, where: str = "", empty_ok: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not (empty_ok or value.strip()):
        got = "missing" if value is None else f"got {type(value).__name__} {value!r:.40}"
        kind = "a string" if empty_ok else "a non-empty string"
        raise RowError(f"expected {kind} `{where}{key}` ({got})")
    return value


def _number(row: Mapping[str, Any], key: str, lo: float = -math.inf,
            hi: float = math.inf) -> float:
    value = row.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not lo <= value <= hi:
        span = "a finite number" if math.isinf(lo) else f"a number in [{lo:g}, {hi:g}]"
        raise RowError(f"expected `{key}` to be {span}, got {value!r}")
    return float(value)


@contextmanager
def _at_row(number: int) -> Iterator[None]:
    """Prefix a ValueError raised inside the block with ``row N: ``."""
    try:
        yield
    except ValueError as err:
        raise RowError(f"row {number}: {err}") from None


def transcript(turns: Iterable[tuple[str, str]]) -> str:
    """HH-style transcript of (role, text) turns, ending with an open Assistant turn.

    >>> transcript([("user", "hi"), ("assistant", "yo"), ("user", "bye")])
    '\\n\\nHuman: hi\\n\\nAssistant: yo\\n\\nHuman: bye\\n\\nAssistant:'
    """
    marker = {"user": HUMAN, "assistant": ASSISTANT}
    return "".join(f"{marker[role]} {text.strip()}" for role, text in turns) + ASSISTANT


# ---------------------------------------------------------------- converters


def _convert_hh(rows: Rows, weights: Mapping[str, float]) -> Iterator[PreferencePair | None]:
    for number, row in rows:
        with _at_row(number):
            pair = split_transcripts(_text(row, "chosen"), _text(row, "rejected"))
        yield pair


def _tldr_prompt(info: Mapping[str, Any]) -> str:
    """The Stiennon et al. (2020) query, ``SUBREDDIT: r/…\\n\\nTITLE: …\\n\\nPOST: …\\n\\nTL;DR:``;
    CNN/DM rows (no post, an ``article``) give ``ARTICLE: …`` instead."""
    body = ("POST", info["post"]) if info.get("post") else ("ARTICLE", info.get("article"))
    if not isinstance(body[1], str) or not body[1].strip():
        raise RowError("expected a non-empty string `info.post` (or `info.article`)")
    fields = [("SUBREDDIT", f"r/{info['subreddit']}" if info.get("subreddit") else None),
              ("TITLE", info.get("title")), body]
    query = "\n\n".join(f"{name}: {str(value).strip()}" for name, value in fields if value)
    return transcript([("user", f"{query}\n\nTL;DR:")])


def _convert_tldr(rows: Rows, weights: Mapping[str, float]) -> Iterator[PreferencePair | None]:
    for number, row in rows:
        with _at_row(number):
            info, summaries, choice = row.get("info"), row.get("summaries"), row.get("choice")
            if not isinstance(info, Mapping):
                raise RowError("expected an object `info` with `post`, `title`, `subreddit`")
            if not isinstance(summaries, list) or len(summaries) != 2 or not all(
                    isinstance(s, Mapping) for s in summaries):
                raise RowError("expected `summaries` to be a list of 2 objects with `text`")
            texts = [_text(s, "text", where=f"summaries[{i}].") for i, s in enumerate(summaries)]
            if not isinstance(choice, int) or isinstance(choice, bool) or choice not in (0, 1):
                raise RowError(f"expected `choice` to be 0 or 1 (an index into `summaries`), "
                               f"got {choice!r}")
            pair = PreferencePair(_tldr_prompt(info), texts[choice].strip(),
                                  texts[1 - choice].strip())
        yield pair


def _helpsteer_prompt(prompt: str) -> str:
    """HelpSteer2 marks earlier turns of a multi-turn prompt with ``<extra_id_1>User``/
    ``<extra_id_1>Assistant``; the text before the first marker is the first user turn."""
    parts = _HELPSTEER_TURN.split(prompt)  # [first, role, text, role, text, …]
    turns = [("user", parts[0])] + [(role.lower(), text)
                                    for role, text in zip(parts[1::2], parts[2::2], strict=True)]
    return transcript(turns)


def _convert_helpsteer2(rows: Rows,
                        weights: Mapping[str, float]) -> Iterator[PreferencePair | None]:
    groups: dict[str, list[tuple[str, float]]] = {}
    for number, row in rows:
        with _at_row(number):
            prompt, response = _text(row, "prompt"), _text(row, "response")
            score = sum(w * _number(row, name, 0, 4) for name, w in weights.items())
        groups.setdefault(prompt, []).append((response.strip(), score))
    for prompt, responses in groups.items():
        context = _helpsteer_prompt(prompt)
        for (first, s1), (second, s2) in combinations(responses, 2):
            if s1 == s2:
                yield None
            else:
                chosen, rejected = (first, second) if s1 > s2 else (second, first)
                yield PreferencePair(context, chosen, rejected, margin=abs(s1 - s2))


def _chat_turns(row: Mapping[str, Any], key: str) -> list[tuple[str, str]]:
    messages = row.get(key)
    if not isinstance(messages, list) or len(messages) < 2:
        raise RowError(f"expected `{key}` to be a list of at least 2 chat messages "
                       f"{{role, content}}, got {messages!r:.60}")
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ("user", "assistant"):
            raise RowError(f"expected `{key}[{i}].role` to be 'user' or 'assistant', "
                           f"got {role!r}")
        # an empty reply is kept: seed_pairs skips and counts it
        turns.append((role, _text(message, "content", where=f"{key}[{i}].", empty_ok=True)))
    if turns[-1][0] != "assistant":
        raise RowError(f"expected the last message of `{key}` to be the assistant's reply")
    return turns


def _convert_ultrafeedback(rows: Rows,
                           weights: Mapping[str, float]) -> Iterator[PreferencePair | None]:
    for number, row in rows:
        with _at_row(number):
            chosen, rejected = _chat_turns(row, "chosen"), _chat_turns(row, "rejected")
            if chosen[:-1] != rejected[:-1]:
                raise RowError("expected `chosen` and `rejected` to share every message but "
                               "the last (the conversation before the reply)")
            margin = _number(row, "score_chosen") - _number(row, "score_rejected")
            if margin < 0:
                raise RowError(f"expected `score_chosen` ≥ `score_rejected`, got "
                               f"{row['score_chosen']} < {row['score_rejected']}")
        yield None if margin == 0 else PreferencePair(
            transcript(chosen[:-1]), chosen[-1][1].strip(), rejected[-1][1].strip(), margin)


FORMATS: dict[str, DatasetFormat] = {
    "hh-rlhf": DatasetFormat("human", "Anthropic/hh-rlhf", None, {}, _convert_hh),
    "tldr": DatasetFormat("human", "openai/summarize_from_feedback", "comparisons", {},
                          _convert_tldr),
    "helpsteer2": DatasetFormat("human", "nvidia/HelpSteer2", None, {}, _convert_helpsteer2),
    "ultrafeedback-binarized": DatasetFormat(
        "ai", "HuggingFaceH4/ultrafeedback_binarized", None,
        {"train": "train_prefs", "test": "test_prefs"}, _convert_ultrafeedback),
}
"""Format name → how to fetch and read it."""


# ---------------------------------------------------------------- reading


def _builder(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in (".json", ".jsonl"):
        return "json"
    if suffixes and suffixes[-1] == ".parquet":
        return "parquet"
    raise ValueError(f"{path}: expected a .json, .jsonl, .json.gz, .jsonl.gz or .parquet file")


def _read_file(path: Path):
    import datasets

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    builder = _builder(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # the json/parquet builders raise many kinds; name the file
        raise ValueError(f"{path}: could not read as {builder}: {err}") from err


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or the hub host does not answer within ``timeout``.

    A cheap check first, because ``datasets`` itself retries an unreachable hub for ~25 s.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _read_hub(source: str, fmt: DatasetFormat, split: str):
    import datasets

    hint = (f"pass a local JSON/JSONL(.gz)/Parquet file instead: "
            f"load_preferences({source!r}, path=...)")
    if source == "hh-rlhf":
        hint += " (the project ships ../shared/data/hh-rlhf/train.jsonl.gz)"
    if not hub_reachable():
        raise HubUnavailableError(
            f"cannot load {source!r} from the Hugging Face hub ({fmt.hub_id}): the hub is "
            f"unreachable (offline, or HF_HUB_OFFLINE is set); {hint}")
    try:
        return datasets.load_dataset(fmt.hub_id, fmt.hub_config,
                                     split=fmt.hub_splits.get(split, split))
    except ConnectionError as err:
        raise HubUnavailableError(f"cannot load {source!r} from the hub ({fmt.hub_id}: {err}); "
                                  f"{hint}") from err


def _check_weights(source: str, weights: Mapping[str, float] | None) -> Mapping[str, float]:
    if weights is None:
        return HELPFULNESS_ONLY
    if source != "helpsteer2":
        raise ValueError(f"attribute_weights apply only to helpsteer2, not {source!r}")
    unknown = sorted(set(weights) - set(ATTRIBUTES))
    if unknown or not weights:
        raise ValueError(f"attribute_weights: expected a non-empty mapping over "
                         f"{', '.join(ATTRIBUTES)}; unknown: {', '.join(unknown) or '-'}")
    bad = [k for k, w in weights.items() if not isinstance(w, int | float) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"attribute_weights: expected finite numbers, got {bad[0]}="
                         f"{weights[bad[0]]!r}")
    return {k: float(w) for k, w in weights.items()}


def load_preferences(source: str, path: str | Path | None = None, split: str = "train",
                     limit: int | None = None,
                     attribute_weights: Mapping[str, float] | None = None) -> LoadedPairs:
    """Load one public preference dataset as pairs.

    Args:
        source: A format name, one of :data:`FORMATS`.
        path: A local ``.json``/``.jsonl``(``.gz``)/``.parquet`` file in the dataset's own
            schema; None fetches ``split`` from the hub (which fails fast when unreachable).
        split: The hub split (``train`` means ``train_prefs`` for UltraFeedback); ignored with
            ``path``.
        limit: Keep only the first ``limit`` pairs (None: all); skips are counted up to there.
        attribute_weights: HelpSteer2 only: attribute → weight of the score that ranks two
            responses to one prompt (default :data:`HELPFULNESS_ONLY`; see also
            :data:`NEMOTRON_340B_WEIGHTS`). Every pair of responses to a prompt is compared;
            the margin is the score difference; equal scores are skipped, not recorded as ties.

    Returns:
        The pairs, the labeler kind, the number of skipped candidates and where they came from.

    Raises:
        ValueError: For an unknown source, a bad argument, or a bad row (naming the file, the
            1-based row and the field).
        FileNotFoundError: If ``path`` does not exist.
        HubUnavailableError: Without ``path``, when the hub cannot be reached.
    """
    if source not in FORMATS:
        raise ValueError(f"unknown preference source {source!r}; expected one of "
                         f"{', '.join(FORMATS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected a positive integer or None, got {limit!r}")
    fmt, weights = FORMATS[source], _check_weights(source, attribute_weights)
    if path is not None:
        origin, rows = str(path), _read_file(Path(path))
    else:
        origin, rows = f"{fmt.hub_id}:{split}", _read_hub(source, fmt, split)
    pairs: list[PreferencePair] = []
    skipped = 0
    try:
        for pair in fmt.convert(enumerate(rows, start=1), weights):
            if limit is not None and len(pairs) >= limit:
                break
            if pair is None:
                skipped += 1
            else:
                pairs.append(pair)
    except RowError as err:
        raise RowError(f"{origin}: {err}") from None
    return LoadedPairs(pairs, fmt.labeler_kind, source, skipped, origin)
