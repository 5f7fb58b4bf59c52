"""Preference dataset loaders on hand-made rows in each dataset's real schema, and on the real
shipped HH file (read through `datasets`, checked against the plain-JSON HH reader)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.core import datasets as ds
from actors.core.datasets import (
    NEMOTRON_340B_WEIGHTS,
    HubUnavailableError,
    load_preferences,
    transcript,
)
from actors.core.hh import PreferencePair, load_hh_jsonl, transcript_messages

FIXTURES = Path(__file__).parent / "fixtures"
HAIKU = "Soft rain on the roof\nthe gutters hum a low song\npuddles hold the sky"
FRANCE = "\n\nHuman: What is the capital of France?\n\nAssistant:"
RAIN = "\n\nHuman: Write a haiku about rain.\n\nAssistant:"
PRIME = "\n\nHuman: Is 17 prime?\n\nAssistant:"
FRUIT = "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another one?\n\nAssistant:"
JOKE = "Why did the scarecrow win an award? He was outstanding in his field."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def fixture_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


# ---------------------------------------------------------------- hh-rlhf


@pytest.fixture(scope="module")
def hh_train(shared_data):
    return load_preferences("hh-rlhf", path=shared_data / "hh-rlhf" / "train.jsonl.gz")


def test_hh_real_file_through_datasets_equals_plain_reader(hh_train, shared_data):
    plain = load_hh_jsonl(shared_data / "hh-rlhf" / "train.jsonl.gz")
    assert len(hh_train.pairs) == 1879
    assert hh_train.pairs[:50] == plain[:50]
    assert hh_train.pairs == plain  # all 1,879, same prompt/chosen/rejected/margin
    assert (hh_train.labeler_kind, hh_train.source, hh_train.skipped) == ("human", "hh-rlhf", 0)
    assert {p.margin for p in hh_train.pairs} == {0.0}


def test_hh_limit(shared_data, hh_train):
    loaded = load_preferences("hh-rlhf", path=shared_data / "hh-rlhf" / "train.jsonl.gz",
                              limit=50)
    assert loaded.pairs == hh_train.pairs[:50]


def test_hh_bad_row_names_file_row_and_field(tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello",
            "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, good, {"chosen": good["chosen"]}])
    with pytest.raises(ValueError, match=r"hh\.jsonl: row 3: expected a non-empty string "
                                         r"`rejected` \(missing\)"):
        load_preferences("hh-rlhf", path=path)
    path = write_jsonl(tmp_path / "hh2.jsonl", [good, {"chosen": "hello", "rejected": "bye"}])
    with pytest.raises(ValueError, match=r"hh2\.jsonl: row 2: `chosen` has no .*Assistant"):
        load_preferences("hh-rlhf", path=path)


# ---------------------------------------------------------------- tldr


def test_tldr_fixture_exact_pairs():
    loaded = load_preferences("tldr", path=FIXTURES / "tldr.jsonl")
    assert (loaded.labeler_kind, loaded.source, loaded.skipped) == ("human", "tldr", 0)
    assert loaded.pairs == [
        PreferencePair(
            "\n\nHuman: SUBREDDIT: r/relationships\n\nTITLE: Roommate eats my labeled food [22F]"
            "\n\nPOST: My roommate keeps eating my food even after I labeled it. I asked nicely"
            " twice.\nWhat should I do next?\n\nTL;DR:\n\nAssistant:",
            "Roommate ignores my food labels after two polite requests; what now?",  # choice 1
            "roommate eats my food"),
        PreferencePair(
            "\n\nHuman: SUBREDDIT: r/legaladvice\n\nTITLE: Seller ghosted me after selling a"
            " broken bike\n\nPOST: I bought a used bike for $200 and the chain snapped on day one."
            " The seller won't answer.\n\nTL;DR:\n\nAssistant:",
            "Bought a $200 used bike, chain broke day one, seller ghosting me. Options?",
            "bike bad"),
        PreferencePair(  # a CNN/DM row: no post, no title, an article
            "\n\nHuman: ARTICLE: A storm closed three highways on Monday. Officials expect them to"
            " reopen by Wednesday.\n\nTL;DR:\n\nAssistant:",
            "Storm shuts three highways until midweek.",
            "Highways reopen Wednesday after storm closure."),
    ]


@pytest.mark.parametrize(("change", "message"), [
    ({"choice": 2}, r"row 2: expected `choice` to be 0 or 1 \(an index into `summaries`\), got 2"),
    ({"choice": None}, r"row 2: expected `choice` to be 0 or 1 .*got None"),
    ({"summaries": [{"text": "only one", "policy": "ref", "note": None}]},
     r"row 2: expected `summaries` to be a list of 2 objects"),
    ({"info": {"id": "x", "post": None, "title": "t", "subreddit": "s", "site": None,
               "article": None}},
     r"row 2: expected a non-empty string `info.post` \(or `info.article`\)"),
])
def test_tldr_bad_rows(tmp_path, change, message):
    rows = fixture_rows("tldr.jsonl")
    rows[1] = {**rows[1], **change}
    with pytest.raises(ValueError, match=r"tldr\.jsonl: " + message):
        load_preferences("tldr", path=write_jsonl(tmp_path / "tldr.jsonl", rows))


# ---------------------------------------------------------------- helpsteer2


def test_helpsteer2_default_weights_helpfulness_only():
    loaded = load_preferences("helpsteer2", path=FIXTURES / "helpsteer2.jsonl")
    assert (loaded.labeler_kind, loaded.source) == ("human", "helpsteer2")
    # 4 prompts: France 2 responses, rain 3 (3 candidate pairs, one a tie), prime 2 (a tie),
    # fruit 2 (multi-turn). Pairs come grouped by prompt in first-appearance order.
    assert loaded.pairs == [
        PreferencePair(FRANCE, "Paris is the capital of France, on the Seine.", "Paris.", 1.0),
        PreferencePair(RAIN, HAIKU, "Rain falls on the roof", 2.0),  # helpfulness 4 vs 2
        # "Rain falls on the roof" vs "Rain. Wet. Done.": helpfulness 2 = 2, skipped
        PreferencePair(RAIN, HAIKU, "Rain. Wet. Done.", 2.0),
        # prime: 3 = 3, skipped
        PreferencePair(FRUIT, "Banana.", "Apple.", 3.0),
    ]
    assert loaded.skipped == 2


def test_helpsteer2_custom_weights_hand_scores():
    # score = 0.5·helpfulness − 0.25·verbosity (both exact in binary floating point)
    loaded = load_preferences("helpsteer2", path=FIXTURES / "helpsteer2.jsonl",
                              attribute_weights={"helpfulness": 0.5, "verbosity": -0.25})
    assert loaded.pairs == [
        PreferencePair(FRANCE, "Paris is the capital of France, on the Seine.", "Paris.",
                       0.25),  # 1.5 vs 1.25
        PreferencePair(RAIN, HAIKU, "Rain falls on the roof", 1.0),  # 1.5 vs 0.5
        PreferencePair(RAIN, "Rain. Wet. Done.", "Rain falls on the roof", 0.25),  # 0.75 vs 0.5
        PreferencePair(RAIN, HAIKU, "Rain. Wet. Done.", 0.75),  # 1.5 vs 0.75
        PreferencePair(PRIME, "Yes.", "Yes, 17 is prime: no whole number from 2 to 4 divides it.",
                       0.25),  # 1.5 vs 1.25: the tie is broken by verbosity
        PreferencePair(FRUIT, "Banana.", "Apple.", 1.5),  # 2.0 vs 0.5
    ]
    assert loaded.skipped == 0


def test_helpsteer2_nemotron_weights_prefer_the_concise_answer():
    loaded = load_preferences("helpsteer2", path=FIXTURES / "helpsteer2.jsonl",
                              attribute_weights=NEMOTRON_340B_WEIGHTS, limit=1)
    # "Paris.": 0.3·3 + 0.74·4 + 0.46·4 + 0.47·1 − 0.33·1 = 5.84
    # the long one: 0.3·4 + 0.74·4 + 0.46·4 + 0.47·1 − 0.33·2 = 5.81
    (pair,) = loaded.pairs
    assert pair.chosen == "Paris."
    assert pair.rejected == "Paris is the capital of France, on the Seine."
    assert pair.margin == pytest.approx(0.03, rel=1e-9)


def test_helpsteer2_limit_counts_skips_only_before_the_cut():
    loaded = load_preferences("helpsteer2", path=FIXTURES / "helpsteer2.jsonl", limit=3)
    assert [p.margin for p in loaded.pairs] == [1.0, 2.0, 2.0]
    assert loaded.skipped == 1  # the rain tie lies between pairs 2 and 3; the prime tie after


@pytest.mark.parametrize(("change", "message"), [
    ({"helpfulness": 5}, r"row 3: expected `helpfulness` to be a number in \[0, 4\], got 5"),
    ({"helpfulness": None}, r"row 3: expected `helpfulness` to be a number in \[0, 4\], got None"),
    ({"response": ""}, r"row 3: expected a non-empty string `response` \(got str ''\)"),
])
def test_helpsteer2_bad_rows(tmp_path, change, message):
    rows = fixture_rows("helpsteer2.jsonl")
    rows[2] = {**rows[2], **change}
    with pytest.raises(ValueError, match=r"hs\.jsonl: " + message):
        load_preferences("helpsteer2", path=write_jsonl(tmp_path / "hs.jsonl", rows))


def test_helpsteer2_weights_are_checked():
    path = FIXTURES / "helpsteer2.jsonl"
    with pytest.raises(ValueError, match=r"unknown: harmlessness"):
        load_preferences("helpsteer2", path=path, attribute_weights={"harmlessness": 1.0})
    with pytest.raises(ValueError, match=r"expected finite numbers, got helpfulness=nan"):
        load_preferences("helpsteer2", path=path, attribute_weights={"helpfulness": float("nan")})
    with pytest.raises(ValueError, match=r"attribute_weights apply only to helpsteer2, not 'tldr'"):
        load_preferences("tldr", path=FIXTURES / "tldr.jsonl", attribute_weights={"helpfulness": 1})


# ---------------------------------------------------------------- ultrafeedback-binarized


def test_ultrafeedback_fixture_exact_pairs():
    loaded = load_preferences("ultrafeedback-binarized", path=FIXTURES / "ultrafeedback.jsonl")
    assert (loaded.labeler_kind, loaded.source) == ("ai", "ultrafeedback-binarized")
    assert loaded.pairs == [
        PreferencePair("\n\nHuman: What is 2+2?\n\nAssistant:", "2 + 2 = 4.", "5", 6.0),
        PreferencePair("\n\nHuman: Hi\n\nAssistant: Hello! How can I help?"
                       "\n\nHuman: Tell me a joke.\n\nAssistant:", JOKE, "No.", 6.5),
    ]
    assert loaded.skipped == 1  # "Name a color.": 7.0 vs 7.0


def test_ultrafeedback_multi_turn_round_trips_to_chat_messages():
    row = fixture_rows("ultrafeedback.jsonl")[1]
    pair = load_preferences("ultrafeedback-binarized", path=FIXTURES / "ultrafeedback.jsonl",
                            limit=2).pairs[1]
    assert transcript_messages(pair.prompt, pair.chosen) == [
        {"role": m["role"], "content": m["content"]} for m in row["chosen"]]


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["chosen"].pop(), r"row 2: expected the last message of `chosen` to be the "
                                  r"assistant's reply"),
    (lambda r: r["rejected"][2].update(content="Tell me a pun."),
     r"row 2: expected `chosen` and `rejected` to share every message but the last"),
    (lambda r: r["chosen"][0].update(role="system"),
     r"row 2: expected `chosen\[0\].role` to be 'user' or 'assistant', got 'system'"),
    (lambda r: r["chosen"][1].update(content=None),
     r"row 2: expected a string `chosen\[1\].content` \(missing\)"),
    (lambda r: r.update(score_chosen=1.0), r"row 2: expected `score_chosen` ≥ `score_rejected`"),
    (lambda r: r.pop("score_rejected"), r"row 2: expected `score_rejected` to be a finite number, "
                                        r"got None"),
])
def test_ultrafeedback_bad_rows(tmp_path, change, message):
    rows = fixture_rows("ultrafeedback.jsonl")
    change(rows[1])
    with pytest.raises(ValueError, match=r"uf\.jsonl: " + message):
        load_preferences("ultrafeedback-binarized", path=write_jsonl(tmp_path / "uf.jsonl", rows))


# ---------------------------------------------------------------- files, formats, hub


def test_gz_json_array_and_parquet_read_the_same_pairs(tmp_path):
    rows = fixture_rows("ultrafeedback.jsonl")
    expected = load_preferences("ultrafeedback-binarized", path=FIXTURES / "ultrafeedback.jsonl")
    with open(FIXTURES / "ultrafeedback.jsonl", "rb") as src, \
            gzip.open(tmp_path / "uf.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (tmp_path / "uf.json").write_text(json.dumps(rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    for name in ("uf.jsonl.gz", "uf.json", "uf.parquet"):
        loaded = load_preferences("ultrafeedback-binarized", path=tmp_path / name)
        assert (loaded.pairs, loaded.skipped) == (expected.pairs, 1), name
        assert loaded.origin == str(tmp_path / name)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown preference source 'shp'; expected one of "
                                         r"hh-rlhf, tldr, helpsteer2, ultrafeedback-binarized"):
        load_preferences("shp", path=FIXTURES / "tldr.jsonl")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        load_preferences("tldr", path=tmp_path / "nope.jsonl")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"rows\.csv: expected a \.json, \.jsonl, .*\.parquet"):
        load_preferences("tldr", path=tmp_path / "rows.csv")
    with pytest.raises(ValueError, match=r"limit: expected a positive integer or None, got 0"):
        load_preferences("tldr", path=FIXTURES / "tldr.jsonl", limit=0)


def test_no_hub_fails_fast_and_asks_for_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as info:
        load_preferences("hh-rlhf")
    assert str(info.value) == (
        "cannot load 'hh-rlhf' from the Hugging Face hub (Anthropic/hh-rlhf): the hub is "
        "unreachable (offline, or HF_HUB_OFFLINE is set); pass a local JSON/JSONL(.gz)/Parquet "
        "file instead: load_preferences('hh-rlhf', path=...) (the project ships "
        "../shared/data/hh-rlhf/train.jsonl.gz)")
    with pytest.raises(HubUnavailableError, match=r"\(HuggingFaceH4/ultrafeedback_binarized\)"):
        load_preferences("ultrafeedback-binarized")


def test_hub_reachable_checks_the_endpoint_host(monkeypatch):
    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise OSError("no route")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example:8443")
    monkeypatch.setattr(ds.socket, "create_connection", refuse)
    assert ds.hub_reachable(timeout=0.5) is False
    assert calls == [(("hf-mirror.example", 8443), 0.5)]


def test_transcript_is_the_inverse_of_transcript_messages():
    turns = [("user", "hi"), ("assistant", "yo"), ("user", "bye")]
    prompt = transcript(turns)
    assert prompt == "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: bye\n\nAssistant:"
    assert [(m["role"], m["content"]) for m in transcript_messages(prompt)] == turns
