"""PRMBench and raw PRM800K loaders: exact counts and labels on the real files."""

from __future__ import annotations

import json

import pytest

from actors.core.prm_data import PRMDataError, StepExample, load_prm800k, load_prmbench

CIRCULAR = "prm800k_train_p1_first400_4o_circular.jsonl"


def test_first_train_record_gives_modified_then_original(shared_data):
    examples = load_prmbench(shared_data / "prmbench" / "train" / CIRCULAR, limit=2)
    modified, original = examples
    # line 1: error_steps [2, 3, 4] of 6 modified steps; 5 original steps
    assert modified.labels == (1, 0, 0, 0, 1, 1)
    assert modified.steps[1].startswith("Verify the total seconds by assuming")
    assert original.labels == (1, 1, 1, 1, 1)
    assert original.steps[-1] == "Exactly."
    assert modified.question == original.question == "How many seconds are in 7.8 minutes?"


@pytest.mark.parametrize(("split", "examples", "modified", "wrong", "steps"), [
    # 3203 records, 57 with error_steps past the end; 718 records, 21 such
    ("train", 6349, 3146, 7008, 45642),
    ("holdout", 1415, 697, 1615, 10313),
])
def test_real_split_counts(shared_data, split, examples, modified, wrong, steps):
    folder = shared_data / "prmbench" / split
    assert len(load_prmbench(folder)) == examples
    only_modified = load_prmbench(folder, include_original=False)
    assert len(only_modified) == modified
    assert sum(ex.labels.count(0) for ex in only_modified) == wrong
    assert sum(len(ex.labels) for ex in only_modified) == steps


def test_out_of_range_error_steps_are_skipped_or_raise_with_file_and_line(shared_data):
    path = shared_data / "prmbench" / "train" / CIRCULAR
    lax = load_prmbench(path, include_original=False)
    assert len(lax) == 401 - 3  # 401 records; 3 name an error step past the end
    with pytest.raises(PRMDataError, match=rf"{CIRCULAR}:127: expected field 'error_steps'"):
        load_prmbench(path, strict=True)


def test_limit_counts_examples_not_records(shared_data):
    assert len(load_prmbench(shared_data / "prmbench" / "train", limit=3)) == 3
    assert len(load_prmbench(shared_data / "prmbench" / "train", limit=3,
                             include_original=False)) == 3


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"modified_process": ["a", "b"], "error_steps": [2], "modified_question": "q",
            "original_process": ["a"], "original_question": "q"}
    bad = {k: v for k, v in good.items() if k != "modified_question"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(PRMDataError, match=r"bad.jsonl:3: expected field 'modified_question'"):
        load_prmbench(path)
    assert load_prmbench(path, limit=2) == [StepExample("q", ("a", "b"), (1, 0)),
                                            StepExample("q", ("a",), (1,))]


def test_prm800k_phase2_ends_at_the_step_found_wrong(shared_data):
    path = shared_data / "prm800k-examples" / "prm800k-phase2-train-example.json"
    (example,) = load_prm800k(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert example.labels == (1, 1, 1, 1, 1, 1, 0)  # step 2 is neutral (0) → 1 by default
    assert example.steps == tuple(raw["question"]["pre_generated_steps"][:7])
    assert load_prm800k(path, neutral_label=0)[0].labels == (1, 0, 1, 1, 1, 1, 0)


def test_prm800k_phase1_follows_chosen_and_human_steps(shared_data):
    path = shared_data / "prm800k-examples" / "prm800k-phase1-train-example.json"
    examples = load_prm800k(path)  # three pretty-printed records, concatenated
    assert [len(ex.steps) for ex in examples] == [6, 29, 6]  # record 2 gives up at step 30
    first = examples[0]
    assert first.steps[1] == "We have $3p+e=1.24$ and $5p+e=1.82$."  # the human completion
    assert first.steps[5].startswith("That means a pencil costs 29 c")  # chosen_completion 4
    assert all(label == 1 for ex in examples for label in ex.labels)
    assert examples[2].question.startswith("Compute $58_9 - 18_9.$")


def test_prm800k_bad_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"question": {"problem": "q"}, "label": {"steps": []}}\n{"question": ,\n',
                    encoding="utf-8")
    with pytest.raises(PRMDataError, match=r"broken.json:2: not a JSON record"):
        load_prm800k(path)


def test_prm800k_missing_field_names_the_step(tmp_path):
    path = tmp_path / "nostep.json"
    record = {"question": {"problem": "q"},
              "label": {"steps": [{"chosen_completion": 0, "completions": [{"rating": 1}]}]}}
    path.write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(PRMDataError, match=r"nostep.json:1 \(label.steps\[0\]\): expected "
                                           r"field 'text'"):
        load_prm800k(path)
