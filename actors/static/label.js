// The prefloop label page. No build step, no dependencies.
// Model text is untrusted: it is only ever assigned with textContent, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "prefloop.label.token";
  const POLL_MS = 10000;
  const RETRIES = 3;
  const KEYS = { "1": "a", "2": "b", "3": "tie" };
  const $ = (id) => document.getElementById(id);
  const state = { current: null, busy: false, labeled: 0, waiting: 0, poll: null };

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail);
      this.status = status;
      this.code = code;
    }
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  function newIdempotencyKey() {
    // crypto.getRandomValues works over plain http too (randomUUID needs a secure context).
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function say(message) {
    $("status").textContent = message;
  }

  function showProgress() {
    $("progress").textContent = `Labeled: ${state.labeled} · Waiting: ${state.waiting}`;
  }

  async function api(method, path, body, headers = {}) {
    const init = {
      method,
      cache: "no-store",
      credentials: "omit",
      headers: { Authorization: `Bearer ${token()}`, ...headers },
    };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const detail = (data && data.detail) || `HTTP ${response.status}`;
      const error = new ApiError(response.status, data && data.error, detail);
      if (response.status === 401) signOut(`Token refused: ${detail}`);
      throw error;
    }
    return data;
  }

  // A network failure is retried with the SAME Idempotency-Key: the server records one label.
  async function withRetries(send) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await send();
      } catch (error) {
        if (error instanceof ApiError || attempt >= RETRIES) throw error;
        await new Promise((resolve) => setTimeout(resolve, 300 * attempt));
      }
    }
  }

  function render(comparison) {
    state.current = comparison;
    $("work").hidden = comparison === null;
    $("empty").hidden = comparison !== null;
    if (comparison === null) {
      for (const id of ["comparison-id", "prompt", "response-a", "response-b"]) {
        $(id).textContent = "";
      }
      return;
    }
    $("comparison-id").textContent = String(comparison.id);
    $("prompt").textContent = comparison.prompt;
    $("response-a").textContent = comparison.response_a;
    $("response-b").textContent = comparison.response_b;
  }

  async function loadNext() {
    clearTimeout(state.poll);
    const data = await api("GET", "/api/next");
    state.waiting = data.remaining;
    showProgress();
    render(data.comparison);
    if (data.comparison === null) state.poll = setTimeout(() => act(loadNext), POLL_MS);
  }

  async function submit(choice) {
    const comparison = state.current;
    if (comparison === null) return;
    const key = newIdempotencyKey();
    try {
      await withRetries(() =>
        api("POST", "/api/labels", { comparison_id: comparison.id, choice },
            { "Idempotency-Key": key }));
      state.labeled += 1;
      say("");
    } catch (error) {
      if (!(error instanceof ApiError) || error.status === 401) throw error;
      say(`Comparison ${comparison.id} was not recorded: ${error.message}`);
    }
    await loadNext();
  }

  async function skip() {
    const comparison = state.current;
    if (comparison === null) return;
    await api("POST", "/api/skip", { comparison_id: comparison.id });
    say("");
    await loadNext();
  }

  // One action at a time: a second key press while a request is in flight is ignored.
  async function act(action) {
    if (state.busy) return;
    state.busy = true;
    try {
      await action();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) say(error.message);
    } finally {
      state.busy = false;
    }
  }

  async function start() {
    $("login").hidden = true;
    $("signout").hidden = false;
    const stats = await api("GET", "/api/stats");
    state.labeled = stats.you.labeled;
    $("whoami").textContent = `${stats.you.name} · ${stats.campaign}`;
    await loadNext();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(state.poll);
    render(null);
    $("empty").hidden = true;
    $("signout").hidden = true;
    $("whoami").textContent = "";
    $("progress").textContent = "";
    $("login").hidden = false;
    $("token").value = "";
    $("token").focus();
    say(message || "");
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    $("token").blur();
    act(start);
  });

  $("signout").addEventListener("click", () => signOut("Signed out."));

  for (const button of document.querySelectorAll("[data-choice]")) {
    button.addEventListener("click", () => act(() => submit(button.dataset.choice)));
  }
  document.querySelector("[data-skip]").addEventListener("click", () => act(skip));

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (event.target instanceof Element && event.target.closest("input, textarea")) return;
    if (state.current === null) return;
    if (event.key in KEYS) {
      event.preventDefault();
      act(() => submit(KEYS[event.key]));
    } else if (event.key === "s" || event.key === "S") {
      event.preventDefault();
      act(skip);
    }
  });

  if (token()) act(start);
  else signOut("");
})();
