"""HH transcript parsing, on the real shipped files and on hand-made bad lines."""

from __future__ import annotations

import gzip
import json

import pytest

from actors.core.hh import (
    ASSISTANT,
    PreferencePair,
    load_hh_jsonl,
    split_transcripts,
    transcript_messages,
)

FIRST_PROMPT = (
    "\n\nHuman: what are some pranks with a pen i can do?"
    "\n\nAssistant: Are you looking for practical joke ideas?"
    "\n\nHuman: yep"
    "\n\nAssistant: Ok, I’ll give you a couple examples, and then you can choose if you like any"
    " of them. You can’t actually do all of these, they’re mostly for fun."
    "\n\n1. Draw a penis on a friend’s arm, the idea is that you can draw a really huge penis."
    "\n\n2. Make a list of jokes on someone, and then you can make someone else read it to the"
    " person in front of the person, you’ll probably have to hide the list of jokes."
    "\n\n3. Tell someone you’ll watch them masturbate but hide your eyes, and then while they are"
    " masturbating you will find a new place to watch."
    "\n\nHuman: okay some of these do not have anything to do with pens"
    "\n\nAssistant:"
)


@pytest.fixture(scope="module")
def train_pairs(shared_data):
    return load_hh_jsonl(shared_data / "hh-rlhf" / "train.jsonl.gz")


def test_real_train_file_count_and_first_record(train_pairs):
    assert len(train_pairs) == 1879
    first = train_pairs[0]
    assert first.prompt == FIRST_PROMPT
    assert first.chosen == ("No, sorry!  All of these involve a pen, the point is that you can get"
                            " funny results by doing pranks with pens.")
    assert first.rejected == (
        "There are lots of funny things you can do with pens, here’s one example: use the pen as a"
        " zipper.  It’s where you write your finger in ink, and then you stick it on someone’s"
        " hand and unzip their zipper. It’s really funny.")
    assert first.margin == 0.0


def test_real_files_every_prompt_ends_at_an_assistant_marker(train_pairs, shared_data):
    holdout = load_hh_jsonl(shared_data / "hh-rlhf" / "holdout.jsonl.gz")
    assert len(holdout) == 433
    assert all(p.prompt.endswith(ASSISTANT) for p in train_pairs + holdout)
    # 1,874 records differ only after the last marker; 5 (hand-checked, e.g. line 1028) diverge
    # a turn earlier, so the prompt stops at the last marker the two transcripts share.
    at_last_marker = [p for p in train_pairs if ASSISTANT not in p.chosen + p.rejected]
    assert len(at_last_marker) == 1874
    odd = train_pairs[1027]
    assert odd.prompt.endswith("Isn't that drag kings?\n\nAssistant:")
    assert odd.chosen.startswith("No. Men who impersonate stereotypical women are called drag"
                                 " kings.  Human: Then ")
    assert odd.rejected == ("A drag king is the opposite of a drag queen, like a male who acts"
                            " like a stereotypical woman.")


def test_split_strips_responses_and_keeps_the_whole_shared_prefix():
    pair = split_transcripts("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:  yes ",
                             "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no")
    assert pair == PreferencePair(prompt="\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
                                  chosen="yes", rejected="no")
    # Replies with a common start still split at the marker, not inside the reply.
    same_start = split_transcripts("\n\nHuman: q\n\nAssistant: I think so",
                                   "\n\nHuman: q\n\nAssistant: I think not")
    assert (same_start.chosen, same_start.rejected) == ("I think so", "I think not")


def record(chosen: str, rejected: str) -> dict[str, str]:
    return {"chosen": chosen, "rejected": rejected}


def test_gzip_and_plain_files_read_the_same(tmp_path):
    rows = [record("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: no"),
            record("\n\nHuman: 2+2?\n\nAssistant: 4", "\n\nHuman: 2+2?\n\nAssistant: 5")]
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n"  # a trailing blank line is fine
    (tmp_path / "p.jsonl").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "p.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(text)
    plain, packed = load_hh_jsonl(tmp_path / "p.jsonl"), load_hh_jsonl(tmp_path / "p.jsonl.gz")
    assert plain == packed
    assert [(p.prompt, p.chosen, p.rejected) for p in plain] == [
        ("\n\nHuman: hi\n\nAssistant:", "hello", "no"),
        ("\n\nHuman: 2+2?\n\nAssistant:", "4", "5")]
    assert load_hh_jsonl(tmp_path / "p.jsonl", limit=1) == plain[:1]


GOOD = json.dumps(record("\n\nHuman: x\n\nAssistant: y", "\n\nHuman: x\n\nAssistant: z"))


@pytest.mark.parametrize(("bad_line", "expected"), [
    ("not json", "expected a JSON object"),
    ("[1, 2]", "expected a JSON object with keys `chosen` and `rejected`"),
    (json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: y"}), "missing or not a string: `rejected`"),
    (json.dumps({"chosen": 3, "rejected": "a"}), "missing or not a string: `chosen`"),
    (json.dumps({"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: x\n\nAssistant: z"}),
     "`chosen` has no '\\n\\nAssistant:' turn"),
    (json.dumps(record("\n\nHuman: x\n\nAssistant: y", "\n\nHuman: w\n\nAssistant: z")),
     "must share the same prefix"),
])
def test_bad_line_names_file_line_and_expectation(tmp_path, bad_line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_hh_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")  # 1-based, blank line 2 counted
    assert expected in message


def test_transcript_messages_for_chat_templates():
    prompt = "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: bye\n\nAssistant:"
    assert transcript_messages(prompt, "ok") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]
    assert transcript_messages("What is 2+2?") == [{"role": "user", "content": "What is 2+2?"}]
