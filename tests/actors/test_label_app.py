"""The human label API: who may call it, what it writes, and what it refuses.

Each refusal is checked for its status, its JSON error code, and that nothing reached the
ledger. Most tests drive the app in-process (`TestClient`); concurrency and the Ray actor use a
real uvicorn on a free loopback port.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from actors import label_service
from actors.label_app import LabelSettings, UnsafeBind, create_app
from actors.label_gate import TokenBucket, is_loopback
from actors.label_server import serve_in_thread
from storage.db import engine_for
from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration, NewPreference

BASE = "http://127.0.0.1:8765"
FAST = {"rate_per_s": 1000.0, "burst": 1000}  # no rate limit in the tests that do not test it


@dataclass
class World:
    """A ledger with campaign c1 (3 pending comparisons), c2 (1), and three tokens."""

    url: str
    ledger: Ledger
    comparisons: list[int]
    foreign: int
    alice: str
    bob: str
    root: str


def seed(ledger: Ledger, campaign: str, n: int) -> list[int]:
    """``n`` prompts with two generations each and one comparison per prompt."""
    ledger.ensure_campaign(campaign)
    prompts = ledger.add_prompts(campaign, [f"{campaign} prompt {i}" for i in range(n)])
    gens = ledger.add_generations(campaign, [
        NewGeneration(p, f"{campaign} answer {p}.{k}", 3, 0, "w0", k) for p in prompts
        for k in range(2)])
    return ledger.add_comparisons(campaign, [NewComparison(gens[2 * i], gens[2 * i + 1])
                                             for i in range(n)])


@pytest.fixture
def world(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger = Ledger.open(url)
    comparisons = seed(ledger, "c1", 3)
    foreign = seed(ledger, "c2", 1)[0]
    tokens = [ledger.add_annotator("alice"), ledger.add_annotator("bob"),
              ledger.add_annotator("root", role="admin")]
    yield World(url, ledger, comparisons, foreign, *tokens)
    engine_for(url).dispose()


def client(world: World, **settings) -> TestClient:
    app = create_app(world.ledger, "c1", LabelSettings(**{**FAST, **settings}))
    return TestClient(app, base_url=BASE)


def auth(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def label(c: TestClient, token: str, comparison_id: int, choice: str, key: str) -> httpx.Response:
    body = json.dumps({"comparison_id": comparison_id, "choice": choice})
    return c.post("/api/labels", content=body, headers=auth(token, **{"Idempotency-Key": key}))


def human_rows(world: World) -> list[tuple[int, str, str, str]]:
    snap = world.ledger.snapshot("c1", kinds=("ai", "human", "gold"))
    return [(r.comparison_id, r.choice, r.labeler_kind, r.labeler_id) for r in snap.rows]


def preference_rows(world: World) -> int:
    return world.ledger.row_counts()["preference"]


# -- who may call ----------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "code"), [
    (None, "missing_token"),
    ("Bearer not-a-token", "invalid_token"),
    ("Basic YWxpY2U6eA==", "malformed_token"),
    ("Bearer ", "malformed_token"),
    ("revoked", "invalid_token"),
])
def test_a_request_without_a_live_token_is_401_and_claims_nothing(world, header, code):
    if header == "revoked":
        world.ledger.revoke_annotator("alice")
        header = f"Bearer {world.alice}"
    headers = {} if header is None else {"Authorization": header}
    c = client(world)
    for response in (c.get("/api/next", headers=headers),
                     c.post("/api/labels", content=b'{"comparison_id": 1, "choice": "a"}',
                            headers={**headers, "Idempotency-Key": "k1"})):
        assert response.status_code == 401
        assert response.json()["error"] == code
        assert response.headers["www-authenticate"] == "Bearer"
    assert world.ledger.comparison_counts("c1").pending == 3
    assert preference_rows(world) == 0


def test_an_annotator_token_on_the_admin_endpoint_is_403_and_an_admin_imports(world):
    c = client(world)
    c0, c1, _ = world.comparisons
    body = json.dumps({"labels": [{"comparison_id": c0, "choice": "a", "annotator": "carol"},
                                  {"comparison_id": c1, "choice": "tie", "annotator": "dan",
                                   "strength": 0.5}]})
    refused = c.post("/api/import", content=body, headers=auth(world.alice))
    assert refused.status_code == 403
    assert refused.json()["error"] == "admin_only"
    assert preference_rows(world) == 0

    first = c.post("/api/import", content=body, headers=auth(world.root))
    assert first.status_code == 200
    assert first.json()["created"] == 2 and first.json()["existing"] == 0
    again = c.post("/api/import", content=body, headers=auth(world.root))
    assert again.json() == {**first.json(), "created": 0, "existing": 2}
    assert human_rows(world) == [(c0, "a", "human", "carol"), (c1, "tie", "human", "dan")]
    audit = world.ledger.audit_log()
    assert [(a.who, a.what) for a in audit] == [
        ("root", "import campaign='c1' labels=2 -> created 0"),
        ("root", "import campaign='c1' labels=2 -> created 2"),
        ("alice", "import campaign='c1' -> refused 403 admin_only"),
    ]


# -- labeling --------------------------------------------------------------------------------


def test_next_leases_by_annotator_and_labels_land_as_human_preferences(world):
    c = client(world)
    c0, c1, c2 = world.comparisons
    shown = c.get("/api/next", headers=auth(world.alice)).json()
    assert shown["comparison"]["id"] == c0
    assert (shown["comparison"]["prompt"], shown["comparison"]["response_a"]) == (
        "c1 prompt 0", "c1 answer 1.0")
    assert shown["remaining"] == 2
    assert c.get("/api/next", headers=auth(world.alice)).json()["comparison"]["id"] == c0  # held
    assert c.get("/api/next", headers=auth(world.bob)).json()["comparison"]["id"] == c1

    stolen = label(c, world.alice, c1, "a", "k-steal")  # bob's lease
    assert stolen.status_code == 409 and stolen.json()["error"] == "lease_lost"
    ok = label(c, world.alice, c0, "b", "k-1")
    assert ok.status_code == 200
    assert ok.json() == {"preference_id": 1, "comparison_id": c0, "choice": "b"}
    late = label(c, world.bob, c0, "a", "k-2")  # labeled already, never bob's
    assert late.status_code == 409 and late.json()["error"] == "lease_lost"

    assert human_rows(world) == [(c0, "b", "human", "alice")]
    counts = world.ledger.comparison_counts("c1")
    assert (counts.pending, counts.claimed, counts.labeled) == (1, 1, 1)
    assert c.get("/api/next", headers=auth(world.alice)).json()["comparison"]["id"] == c2
    audit = world.ledger.audit_log()
    assert [(a.who, a.what.split(" -> ")[-1]) for a in audit] == [
        ("bob", "refused 409 lease_lost"),
        ("alice", "preference 1 created"),
        ("alice", "refused 409 lease_lost"),
    ]
    body = json.dumps({"comparison_id": c0, "choice": "b"}).encode()
    assert audit[1].request_hash == hashlib.sha256(body).hexdigest()


def test_skip_moves_on_and_keeps_the_lease_until_it_expires(world):
    c = client(world)
    c0, c1, _ = world.comparisons
    assert c.get("/api/next", headers=auth(world.alice)).json()["comparison"]["id"] == c0
    skipped = c.post("/api/skip", content=json.dumps({"comparison_id": c0}),
                     headers=auth(world.alice))
    assert skipped.json() == {"skipped": c0}
    assert c.get("/api/next", headers=auth(world.alice)).json()["comparison"]["id"] == c1
    counts = world.ledger.comparison_counts("c1")
    assert (counts.pending, counts.claimed, counts.labeled) == (1, 2, 0)
    assert world.ledger.audit_log()[0].what == f"skip campaign='c1' comparison={c0}"


def test_after_a_restart_next_shows_the_comparison_the_annotator_was_looking_at(world):
    c0, c1, c2 = world.comparisons
    before = client(world).get("/api/next", headers=auth(world.alice)).json()["comparison"]
    assert before["id"] == c0
    restarted = TestClient(create_app(Ledger(world.url), "c1", LabelSettings(**FAST)),
                           base_url=BASE)  # a new process: nothing in memory
    assert restarted.get("/api/next", headers=auth(world.alice)).json()["comparison"] == before
    assert restarted.get("/api/next", headers=auth(world.bob)).json()["comparison"]["id"] == c1
    counts = world.ledger.comparison_counts("c1")
    assert (counts.pending, counts.claimed) == (1, 2)  # no second lease for alice
    assert label(restarted, world.alice, c0, "a", "k-1").status_code == 200

    assert restarted.get("/api/next", headers=auth(world.alice)).json()["comparison"]["id"] == c2
    restarted.post("/api/skip", content=json.dumps({"comparison_id": c2}),
                   headers=auth(world.alice))
    nothing = restarted.get("/api/next", headers=auth(world.alice)).json()
    assert nothing == {"comparison": None, "remaining": 0}  # c2 is leased but was put aside


def test_the_same_idempotency_key_replays_and_a_different_body_is_409(world):
    c = client(world)
    c0 = c.get("/api/next", headers=auth(world.alice)).json()["comparison"]["id"]
    answers = [label(c, world.alice, c0, "a", "key-1") for _ in range(5)]
    assert {r.status_code for r in answers} == {200}
    assert [r.headers["idempotent-replayed"] for r in answers] == ["false"] + ["true"] * 4
    assert {r.json()["preference_id"] for r in answers} == {1}
    conflict = label(c, world.alice, c0, "b", "key-1")
    assert conflict.status_code == 409 and conflict.json()["error"] == "idempotency_conflict"
    other_comparison = label(c, world.alice, world.comparisons[1], "a", "key-1")
    assert other_comparison.status_code == 409
    assert preference_rows(world) == 1
    assert human_rows(world) == [(c0, "a", "human", "alice")]
    for bad_key in (None, "", "has space", "x" * 101):
        headers = auth(world.alice) | ({} if bad_key is None else {"Idempotency-Key": bad_key})
        response = c.post("/api/labels", content=json.dumps({"comparison_id": c0, "choice": "a"}),
                          headers=headers)
        assert response.status_code == 400, bad_key
        assert response.json()["error"] == "bad_idempotency_key"


def test_the_same_key_sent_five_times_at_once_records_one_row(world):
    app = create_app(world.ledger, "c1", LabelSettings(port=0, **FAST))
    server = serve_in_thread(app, "127.0.0.1", 0)
    try:
        c0 = httpx.get(f"{server.url}/api/next", headers=auth(world.alice)).json()["comparison"]
        body = json.dumps({"comparison_id": c0["id"], "choice": "tie"})
        barrier, answers = threading.Barrier(5), []

        def send() -> None:
            barrier.wait()
            answers.append(httpx.post(f"{server.url}/api/labels", content=body, timeout=30,
                                      headers=auth(world.alice, **{"Idempotency-Key": "same"})))

        threads = [threading.Thread(target=send) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    assert [r.status_code for r in answers] == [200] * 5
    assert {r.json()["preference_id"] for r in answers} == {1}
    assert sorted(r.headers["idempotent-replayed"] for r in answers) == ["false"] + ["true"] * 4
    assert preference_rows(world) == 1


# -- refused input ---------------------------------------------------------------------------


def test_the_body_cap_is_64_kib(world):
    c = client(world)
    c0 = c.get("/api/next", headers=auth(world.alice)).json()["comparison"]["id"]
    body = json.dumps({"comparison_id": c0, "choice": "a"}).encode()
    exactly = body + b" " * (65_536 - len(body))
    headers = auth(world.alice, **{"Idempotency-Key": "k"})
    over = c.post("/api/labels", content=exactly + b" ", headers=headers)
    assert over.status_code == 413 and over.json()["error"] == "body_too_large"
    chunked = c.post("/api/labels", content=iter([exactly, b" "]), headers=headers)
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413
    assert preference_rows(world) == 0
    assert c.post("/api/labels", content=exactly, headers=headers).status_code == 200


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/labels", {"comparison_id": "C", "choice": "c"}, "choice"),
    ("/api/labels", {"comparison_id": "C", "choice": "A"}, "choice"),
    ("/api/labels", {"comparison_id": "1", "choice": "a"}, "comparison_id"),
    ("/api/labels", {"comparison_id": True, "choice": "a"}, "comparison_id"),
    ("/api/labels", {"comparison_id": -1, "choice": "a"}, "comparison_id"),
    ("/api/labels", {"comparison_id": "C", "choice": "a", "note": "hi"}, "note"),
    ("/api/labels", {"choice": "a"}, "comparison_id"),
    ("/api/labels", "not json", "body"),
    ("/api/import", {"labels": [{"comparison_id": "C", "choice": "a", "annotator": "x",
                                 "strength": "NaN"}]}, "labels[0].strength"),
    ("/api/import", {"labels": [{"comparison_id": "C", "choice": "a", "annotator": "x",
                                 "strength": "Infinity"}]}, "labels[0].strength"),
    ("/api/import", {"labels": [{"comparison_id": "C", "choice": "a",
                                 "annotator": "<script>"}]}, "labels[0].annotator"),
    ("/api/import", {"labels": []}, "labels"),
])
def test_a_bad_schema_is_422_naming_the_field_and_writes_nothing(world, path, body, field):
    c = client(world)
    c0 = c.get("/api/next", headers=auth(world.root)).json()["comparison"]["id"]
    raw = body if isinstance(body, str) else json.dumps(body).replace('"C"', str(c0))
    raw = raw.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
    response = c.post(path, content=raw, headers=auth(world.root, **{"Idempotency-Key": "k"}))
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert response.json()["detail"].startswith(f"{field}: ")
    assert preference_rows(world) == 0


def test_an_unknown_or_foreign_comparison_is_404_and_writes_nothing(world):
    c = client(world)
    for cid, says in ((99_999, "comparison 99999 does not exist"),
                      (world.foreign, f"comparison {world.foreign} belongs to campaign id 2")):
        response = label(c, world.alice, cid, "a", f"k{cid}")
        assert response.status_code == 404
        assert response.json()["error"] == "unknown_comparison"
        assert says in response.json()["detail"]
        body = json.dumps({"labels": [{"comparison_id": cid, "choice": "a", "annotator": "x"}]})
        assert c.post("/api/import", content=body, headers=auth(world.root)).status_code == 404
    assert preference_rows(world) == 0


def test_a_foreign_host_or_a_cross_origin_request_is_403(world):
    c = client(world, allowed_hosts=("label.example.org",),
               allowed_origins=("https://label.example.org",))
    for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example"):
        for path in ("/", "/api/next", "/healthz"):
            response = c.get(path, headers=auth(world.alice, Host=host))
            assert response.status_code == 403, (host, path)
            assert response.json()["error"] == "forbidden_host"
    for host in ("localhost:8765", "[::1]:8765", "127.0.0.1", "label.example.org"):
        assert c.get("/healthz", headers={"Host": host}).status_code == 200, host

    c0 = c.get("/api/next", headers=auth(world.alice)).json()["comparison"]["id"]
    body = json.dumps({"comparison_id": c0, "choice": "a"})
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "file://"):
        response = c.post("/api/labels", content=body,
                          headers=auth(world.alice, Origin=origin, **{"Idempotency-Key": "k"}))
        assert response.status_code == 403, origin
        assert response.json()["error"] == "forbidden_origin"
    assert preference_rows(world) == 0
    for i, origin in enumerate((BASE, "https://label.example.org")):
        response = c.post("/api/labels", content=body,
                          headers=auth(world.alice, Origin=origin, **{"Idempotency-Key": "k"}))
        assert response.status_code == 200, (i, response.json())
    preflight = c.options("/api/labels", headers={"Origin": "http://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
    assert preflight.status_code in (403, 405)
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in c.get("/").headers


def test_each_token_is_rate_limited_with_retry_after(world):
    c = client(world, rate_per_s=0.001, burst=3)
    answers = [c.get("/api/stats", headers=auth(world.alice)) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[3].json()["error"] == "rate_limited"
    assert answers[3].headers["retry-after"] == "1000"  # (1 - ~0 tokens) / 0.001 per s
    assert c.get("/api/stats", headers=auth(world.bob)).status_code == 200  # per token


def test_token_bucket_refills_at_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.take("a"), bucket.take("a")] == [0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)
    now[0] = 0.25
    assert bucket.take("a") == pytest.approx(0.25)
    now[0] = 0.5
    assert bucket.take("a") == 0.0
    assert bucket.take("b") == 0.0
    now[0] = 100.0
    assert [bucket.take("a"), bucket.take("a"), bucket.take("a") > 0] == [0.0, 0.0, True]


# -- binding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("label.example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_non_loopback_bind_is_refused_until_a_token_is_live(tmp_path):
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'l.sqlite'}")
    ledger.ensure_campaign("c1")
    assert create_app(ledger, "c1", LabelSettings()) is not None  # loopback: fine without
    with pytest.raises(UnsafeBind, match=r"refusing to bind the label service to '0\.0\.0\.0'"):
        create_app(ledger, "c1", LabelSettings(host="0.0.0.0"))
    ledger.add_annotator("alice")
    ledger.revoke_annotator("alice")
    with pytest.raises(UnsafeBind, match="no live annotator token"):
        create_app(ledger, "c1", LabelSettings(host="10.0.0.5"))
    token = ledger.add_annotator("bob")
    app = create_app(ledger, "c1", LabelSettings(host="10.0.0.5"))
    served = TestClient(app, base_url="http://10.0.0.5:8765")  # the bound host is allowed
    assert served.get("/api/stats", headers=auth(token)).status_code == 200


# -- counts and hosting ----------------------------------------------------------------------


def test_stats_count_by_status_and_by_annotator(world):
    c = client(world)
    c2 = world.comparisons[2]
    for token, key in ((world.alice, "a1"), (world.bob, "b1")):
        cid = c.get("/api/next", headers=auth(token)).json()["comparison"]["id"]
        assert label(c, token, cid, "a", key).status_code == 200
    body = json.dumps({"labels": [{"comparison_id": c2, "choice": "b", "annotator": "carol"}]})
    assert c.post("/api/import", content=body, headers=auth(world.root)).status_code == 200
    admin = c.get("/api/stats", headers=auth(world.root)).json()
    assert admin["comparisons"] == {"pending": 0, "claimed": 0, "labeled": 3}
    assert admin["labels_by_kind"] == {"human": 3}
    assert admin["by_annotator"] == {"alice": 1, "bob": 1, "carol": 1}
    mine = c.get("/api/stats", headers=auth(world.alice)).json()
    assert mine["by_annotator"] == {"alice": 1}
    assert mine["you"] == {"name": "alice", "role": "annotator", "labeled": 1}


def test_a_revoked_token_is_refused_once_its_last_check_is_auth_ttl_old(world, monkeypatch):
    monkeypatch.setattr(label_service, "AUTH_TTL_S", 3600.0)
    c = client(world)
    assert c.get("/api/stats", headers=auth(world.alice)).status_code == 200
    world.ledger.revoke_annotator("alice")
    assert c.get("/api/stats", headers=auth(world.alice)).status_code == 200  # trusted still
    assert c.get("/api/stats", headers=auth("not-a-token")).status_code == 401
    monkeypatch.setattr(label_service, "AUTH_TTL_S", 0.0)  # the last check is too old now
    refused = c.get("/api/stats", headers=auth(world.alice))
    assert (refused.status_code, refused.json()["error"]) == (401, "invalid_token")
    assert c.get("/api/stats", headers=auth(world.bob)).status_code == 200


def test_stats_reuse_recent_counts_but_an_annotators_own_count_is_exact(world, monkeypatch):
    monkeypatch.setattr(label_service, "STATS_TTL_S", 3600.0)
    monkeypatch.setattr(label_service, "STATS_STALE_S", 7200.0)
    c = client(world)
    first = c.get("/api/stats", headers=auth(world.root)).json()
    assert first["comparisons"] == {"pending": 3, "claimed": 0, "labeled": 0}
    assert first["by_annotator"] == {} and first["labels_by_kind"] == {}
    # a label recorded past the service (another process): not counted until a recount
    world.ledger.record_preference("c1", NewPreference(world.comparisons[2], "b", "ai", "judge"))
    cid = c.get("/api/next", headers=auth(world.alice)).json()["comparison"]["id"]
    assert label(c, world.alice, cid, "a", "k1").status_code == 200
    assert label(c, world.alice, cid, "a", "k1").status_code == 200  # a replay adds nothing
    admin = c.get("/api/stats", headers=auth(world.root)).json()
    assert admin["as_of"] == first["as_of"]  # the same counts ...
    assert admin["comparisons"] == first["comparisons"]
    assert admin["by_annotator"] == {"alice": 1}  # ... plus this service's own label
    assert admin["labels_by_kind"] == {"human": 1}
    assert c.get("/api/stats", headers=auth(world.alice)).json()["you"]["labeled"] == 1
    monkeypatch.setattr(label_service, "STATS_STALE_S", 0.0)  # too old now: counted again
    again = c.get("/api/stats", headers=auth(world.root)).json()
    assert again["as_of"] > first["as_of"]
    assert again["comparisons"] == {"pending": 1, "claimed": 0, "labeled": 2}
    assert again["labels_by_kind"] == {"ai": 1, "human": 1}
    assert again["by_annotator"] == {"alice": 1}


def test_the_ray_actor_serves_the_app_and_stops(world, ray_local):
    from actors.label_server import LabelServer

    server = LabelServer.remote(world.url, "c1", LabelSettings(port=0))
    url = ray_local.get(server.start.remote(), timeout=60)
    assert url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{url}/healthz").json() == {"ok": True, "campaign": "c1"}
    stats = httpx.get(f"{url}/api/stats", headers=auth(world.root)).json()
    assert stats["comparisons"]["pending"] == 3
    ray_local.get(server.stop.remote(), timeout=30)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)
    ray_local.kill(server)
