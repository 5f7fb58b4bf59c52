"""The label page in real Chromium (Playwright, /usr/bin/chromium) against a real uvicorn.

An annotator enters a token, sees the prompt and both responses, labels with the keyboard
(1 = A, 2 = B, 3 = tie, s = skip), and the rows appear in the ledger. A response that carries
HTML shows as literal text and creates no element.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from actors.label_app import LabelSettings, create_app
from actors.label_server import serve_in_thread
from storage.db import engine_for
from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration

PAYLOAD = ('<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
           '<b id="injected">bold</b> & <!-- not a comment -->')


@pytest.fixture
def served(tmp_path: Path):
    """uvicorn on a free loopback port over a ledger with 4 comparisons; yields (url, ledger,
    comparison ids, alice's token)."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger = Ledger.open(url)
    ledger.ensure_campaign("c1")
    prompts = ledger.add_prompts("c1", [f"prompt {i}\n  second line" for i in range(4)])
    texts = {(0, 0): PAYLOAD}
    gens = ledger.add_generations("c1", [
        NewGeneration(p, texts.get((i, k), f"answer {i}.{k}"), 3, 0, "w0", k)
        for i, p in enumerate(prompts) for k in range(2)])
    comparisons = ledger.add_comparisons(
        "c1", [NewComparison(gens[2 * i], gens[2 * i + 1]) for i in range(4)])
    token = ledger.add_annotator("alice")
    server = serve_in_thread(create_app(ledger, "c1", LabelSettings(port=0)), "127.0.0.1", 0)
    yield server.url, ledger, comparisons, token
    server.stop()
    engine_for(url).dispose()


def rows(ledger: Ledger) -> list[tuple[int, str, str, str]]:
    snap = ledger.snapshot("c1", kinds=("ai", "human", "gold"))
    return [(r.comparison_id, r.choice, r.labeler_kind, r.labeler_id) for r in snap.rows]


def test_an_annotator_labels_three_comparisons_with_the_keyboard(page: Page, served):
    url, ledger, (c0, c1, c2, c3), token = served
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/api/labels") else None)
    page.goto(f"{url}/")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", token)
    page.press("#token", "Enter")

    expect(page.locator("#comparison-id")).to_have_text(str(c0))
    assert page.locator("#prompt").text_content() == "prompt 0\n  second line"
    assert page.locator("#response-a").text_content() == PAYLOAD  # literal text
    assert page.locator("#response-b").text_content() == "answer 0.1"
    assert page.locator("#injected").count() == 0
    assert page.locator("#response-a *").count() == 0  # no element was created from it
    assert page.evaluate("window.__pwned") is None
    expect(page.locator("#progress")).to_have_text("Labeled: 0 · Waiting: 3")

    page.keyboard.press("1")
    expect(page.locator("#comparison-id")).to_have_text(str(c1))
    expect(page.locator("#progress")).to_have_text("Labeled: 1 · Waiting: 2")
    assert rows(ledger) == [(c0, "a", "human", "alice")]

    page.keyboard.press("s")  # c1 stays leased (and unlabeled) until its lease runs out
    expect(page.locator("#comparison-id")).to_have_text(str(c2))
    expect(page.locator("#progress")).to_have_text("Labeled: 1 · Waiting: 1")

    page.keyboard.press("2")
    expect(page.locator("#comparison-id")).to_have_text(str(c3))
    page.keyboard.press("3")
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#work")).to_be_hidden()
    expect(page.locator("#progress")).to_have_text("Labeled: 3 · Waiting: 0")
    assert rows(ledger) == [(c0, "a", "human", "alice"), (c2, "b", "human", "alice"),
                            (c3, "tie", "human", "alice")]

    keys = [r.headers.get("idempotency-key", "") for r in sent]
    assert len(keys) == 3 and len(set(keys)) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", k) for k in keys), keys
    assert "authorization" in sent[0].headers

    page.reload()  # the token is kept for this tab: no second login
    expect(page.locator("#progress")).to_have_text("Labeled: 3 · Waiting: 0")
    expect(page.locator("#login")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('prefloop.label.token')") == token
    assert page.evaluate("localStorage.length") == 0


def test_a_refused_token_asks_again_and_is_forgotten(page: Page, served):
    url, ledger, _, _ = served
    page.goto(f"{url}/")
    page.fill("#token", "not-a-token")
    page.press("#token", "Enter")
    expect(page.locator("#status")).to_contain_text("Token refused: the token is unknown or "
                                                    "revoked")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#work")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    assert ledger.comparison_counts("c1").pending == 4
