"""The labeling page: one self-contained HTML document (inline CSS and JS, nothing fetched from a CDN).

The page holds no data: it asks for the labeler's token, keeps it in sessionStorage (gone when the
tab closes) and talks to the JSON API with ``Authorization: Bearer``. Prompts and responses are
shown as the server rendered them (``pair["html"]``, align/label/markdown.py: escaped first, then a
Markdown subset with no attributes); every other text from the store goes in with ``textContent``. So
a response that contains HTML is shown, never run. Long turns and responses scroll inside their box;
a system prompt is shown first, marked as such.

Keyboard: 1 / 2 choose A / B, t tie, q / w / e / r the rating, z / x mark A / B unsafe, s skip,
Enter submit, u undo my last label (the pair comes back with that label filled in).

`ADMIN_PAGE` (``/admin``) shows, for an admin's token, every round's progress and quality: agreement
with the majority, kappa, gold accuracy, time per label, tie and skip shares, per round and labeler.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>align · preference labeling</title>
<style>
  :root { --fg:#1d2430; --muted:#5b6575; --line:#d8dde6; --bg:#f5f7fa; --card:#fff; --accent:#2457d6;
          --accent-bg:#e8eefc; --bad:#b42318; --bad-bg:#fdecea; --good:#067647; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg); background:var(--bg); }
  header { display:flex; align-items:center; gap:16px; padding:10px 20px; background:var(--card); border-bottom:1px solid var(--line); }
  header h1 { font-size:17px; margin:0; font-weight:600; }
  header .spacer { flex:1; }
  #progress { font-variant-numeric: tabular-nums; }
  #progress-bar { width:160px; height:8px; background:var(--line); border-radius:4px; overflow:hidden; }
  #progress-fill { height:100%; width:0; background:var(--accent); }
  main { max-width:1200px; margin:0 auto; padding:16px 20px 40px; }
  .hidden { display:none !important; }
  .card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
  #login { max-width:420px; margin:60px auto; }
  #login input { width:100%; padding:8px 10px; font:inherit; border:1px solid var(--line); border-radius:6px; }
  button { font:inherit; padding:7px 12px; border:1px solid var(--line); border-radius:6px; background:var(--card); cursor:pointer; }
  button:hover { border-color:var(--accent); }
  button[aria-pressed="true"] { background:var(--accent); border-color:var(--accent); color:#fff; }
  button.primary { background:var(--accent); color:#fff; border-color:var(--accent); }
  button:disabled { opacity:.45; cursor:not-allowed; }
  kbd { font:12px ui-monospace, monospace; border:1px solid var(--line); border-bottom-width:2px; border-radius:4px; padding:0 5px; background:#fafbfc; color:var(--fg); }
  button[aria-pressed="true"] kbd, button.primary kbd { background:transparent; color:#fff; border-color:rgba(255,255,255,.6); }
  .meta { color:var(--muted); font-size:13px; margin-bottom:8px; }
  .badge { display:inline-block; padding:0 8px; border-radius:10px; background:var(--accent-bg); color:var(--accent); font-size:12px; }
  .badge.safety { background:var(--bad-bg); color:var(--bad); }
  .turn { margin:6px 0; padding:8px 10px; border-radius:6px; background:#f0f2f6; max-height:300px; overflow:auto; }
  .turn.system { background:#fff6e5; border-left:4px solid #d98e04; }
  #prompt .none { color:var(--muted); font-size:13px; font-style:italic; }
  .md p { margin:0 0 .6em; } .md p:last-child { margin-bottom:0; }
  .md pre { background:#eef1f5; border:1px solid var(--line); border-radius:6px; padding:8px 10px; overflow:auto; white-space:pre; margin:0 0 .6em; }
  .md code { font:13px/1.45 ui-monospace, SFMono-Regular, Menlo, monospace; background:#eef1f5; border-radius:3px; padding:0 3px; }
  .md pre code { background:none; padding:0; }
  .md ul, .md ol { margin:0 0 .6em; padding-left:1.4em; }
  .turn .role { display:block; font-size:12px; font-weight:600; text-transform:uppercase; color:var(--muted); }
  .pair { display:grid; grid-template-columns:1fr 1fr; gap:14px; margin:14px 0; }
  .resp { display:flex; flex-direction:column; gap:10px; }
  .resp.chosen { outline:3px solid var(--accent); }
  .resp h3 { margin:0; font-size:15px; }
  .resp .text { flex:1; min-height:80px; max-height:420px; overflow:auto; overflow-wrap:anywhere; }
  .resp .row { display:flex; gap:10px; align-items:center; justify-content:space-between; }
  .resp label.unsafe { color:var(--bad); user-select:none; }
  .controls { display:flex; flex-wrap:wrap; gap:8px; align-items:center; margin:10px 0; }
  .controls .label { width:120px; color:var(--muted); }
  #status { min-height:22px; margin-top:8px; }
  #status.error { color:var(--bad); }
  #status.ok { color:var(--good); }
  .keys { color:var(--muted); font-size:13px; margin-top:14px; }
  .keys span { margin-right:14px; white-space:nowrap; }
</style>
</head>
<body>
<header>
  <h1>align · preference labeling</h1>
  <span class="spacer"></span>
  <span id="who"></span>
  <div id="progress-bar" title="labeled / assigned"><div id="progress-fill"></div></div>
  <span id="progress"></span>
  <button id="undo" class="hidden" type="button" title="remove your last label and show its pair again">Undo last <kbd>u</kbd></button>
  <button id="logout" class="hidden" type="button">Sign out</button>
</header>
<main>
  <form id="login" class="card hidden" autocomplete="off">
    <h2 style="margin-top:0">Sign in</h2>
    <p class="meta">Paste the token you were given (<code>align label add-labeler NAME</code>). It is kept in this tab only.</p>
    <input id="token" type="password" placeholder="token" aria-label="token">
    <div style="margin-top:10px"><button id="login-btn" class="primary" type="submit">Sign in</button></div>
    <div id="login-error" class="meta" style="color:var(--bad)"></div>
  </form>

  <section id="work" class="hidden">
    <div class="meta"><span id="pair-label"></span> <span id="category" class="badge"></span></div>
    <div class="card"><div class="meta">Conversation</div><div id="prompt"></div></div>
    <div class="pair">
      <div class="card resp" id="card-a">
        <h3>Response A</h3>
        <div class="text md" id="resp-a"></div>
        <div class="row">
          <label class="unsafe"><input type="checkbox" id="unsafe-a"> A is unsafe <kbd>z</kbd></label>
          <button type="button" id="choose-a" aria-pressed="false">A is better <kbd>1</kbd></button>
        </div>
      </div>
      <div class="card resp" id="card-b">
        <h3>Response B</h3>
        <div class="text md" id="resp-b"></div>
        <div class="row">
          <label class="unsafe"><input type="checkbox" id="unsafe-b"> B is unsafe <kbd>x</kbd></label>
          <button type="button" id="choose-b" aria-pressed="false">B is better <kbd>2</kbd></button>
        </div>
      </div>
    </div>
    <div class="card">
      <div class="controls"><span class="label">Preference</span>
        <button type="button" id="choose-tie" aria-pressed="false">Tie: neither is better <kbd>t</kbd></button>
      </div>
      <div class="controls" id="ratings"><span class="label">How much better</span>
        <button type="button" id="rate-significantly_better" data-rating="significantly_better" aria-pressed="false">Significantly better <kbd>q</kbd></button>
        <button type="button" id="rate-better" data-rating="better" aria-pressed="false">Better <kbd>w</kbd></button>
        <button type="button" id="rate-slightly_better" data-rating="slightly_better" aria-pressed="false">Slightly better <kbd>e</kbd></button>
        <button type="button" id="rate-negligibly_better" data-rating="negligibly_better" aria-pressed="false">Negligibly better / unsure <kbd>r</kbd></button>
      </div>
      <div class="controls"><span class="label"></span>
        <button type="button" id="submit" class="primary" disabled>Submit <kbd>Enter</kbd></button>
        <button type="button" id="skip">Skip <kbd>s</kbd></button>
      </div>
      <div id="status"></div>
    </div>
    <div class="keys">Keyboard:
      <span><kbd>1</kbd>/<kbd>2</kbd> A / B is better</span><span><kbd>t</kbd> tie</span>
      <span><kbd>q</kbd> <kbd>w</kbd> <kbd>e</kbd> <kbd>r</kbd> significantly / better / slightly / negligibly</span>
      <span><kbd>z</kbd>/<kbd>x</kbd> A / B unsafe</span><span><kbd>s</kbd> skip</span><span><kbd>Enter</kbd> submit</span>
      <span><kbd>u</kbd> undo last</span>
    </div>
  </section>

  <section id="done" class="card hidden">
    <h2 style="margin-top:0">Nothing left to label</h2>
    <p class="meta">Every pair assigned to you is labeled. Thank you! <button type="button" id="refresh">Check again</button></p>
    <div id="done-status" class="meta"></div>
  </section>
</main>
<script>
"use strict";
(() => {
  const KEY = "align-label-token";
  const RATING_KEYS = {q: "significantly_better", w: "better", e: "slightly_better", r: "negligibly_better"};
  const $ = (id) => document.getElementById(id);
  let pair = null, choice = null, rating = null, busy = false;

  function token() { return sessionStorage.getItem(KEY); }

  async function api(method, path, body) {
    const res = await fetch(path, {method, headers: Object.assign({"Authorization": "Bearer " + token()},
      body ? {"Content-Type": "application/json"} : {}), body: body ? JSON.stringify(body) : undefined});
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (res.status === 401) { signOut("Your token was not accepted; sign in again."); throw new Error("401"); }
    if (!res.ok) {
      const d = data && data.detail;
      const msg = Array.isArray(d) ? d.map((x) => x.msg).join("; ") : (d || res.statusText);
      throw new Error(res.status + ": " + msg);
    }
    return data;
  }

  function show(id) { for (const s of ["login", "work", "done"]) $(s).classList.toggle("hidden", s !== id); }

  function status(text, kind) {
    const el = $("status"); el.textContent = text || ""; el.className = kind || "";
    $("done-status").textContent = text || "";
  }

  function setProgress(p) {
    if (!p) return;
    const total = Math.max(p.assigned, p.labeled);
    $("progress").textContent = p.labeled + " / " + total + " labeled" + (p.available ? " (+" + p.available + " open)" : "");
    $("progress-fill").style.width = (total ? (100 * p.labeled / total) : 0) + "%";
  }

  function render() {
    for (const c of ["a", "b", "tie"]) $("choose-" + c).setAttribute("aria-pressed", String(choice === c));
    $("card-a").classList.toggle("chosen", choice === "a");
    $("card-b").classList.toggle("chosen", choice === "b");
    for (const btn of document.querySelectorAll("#ratings button")) {
      btn.setAttribute("aria-pressed", String(rating === btn.dataset.rating));
      btn.disabled = choice === "tie";
    }
    $("submit").disabled = busy || !(choice === "tie" || ((choice === "a" || choice === "b") && rating));
  }

  function choose(c) { if (!pair) return; choice = c; if (c === "tie") rating = null; render(); }
  function rate(r) { if (!pair || choice === "tie") return; rating = r; render(); }
  function toggleUnsafe(side) { if (!pair) return; const el = $("unsafe-" + side); el.checked = !el.checked; }

  function showPair(p) {
    pair = p; choice = null; rating = null;
    $("unsafe-a").checked = false; $("unsafe-b").checked = false;
    $("pair-label").textContent = "Round " + p.round + " · pair " + p.id;
    $("category").textContent = p.category;
    $("category").className = "badge" + (p.category === "safety" ? " safety" : "");
    const box = $("prompt"); box.replaceChildren();
    if (!p.prompt.some((m) => m.role === "system")) {
      const none = document.createElement("div"); none.className = "none"; none.textContent = "no system prompt";
      box.append(none);
    }
    p.prompt.forEach((m, i) => {
      const turn = document.createElement("div"); turn.className = "turn" + (m.role === "system" ? " system" : "");
      const role = document.createElement("span"); role.className = "role";
      role.textContent = m.role === "system" ? "system prompt" : m.role;
      const body = document.createElement("div"); body.className = "md";
      body.innerHTML = p.html.prompt[i];  // server-rendered: escaped first, tags without attributes only
      turn.append(role, body); box.append(turn);
    });
    $("resp-a").innerHTML = p.html.response_a;
    $("resp-b").innerHTML = p.html.response_b;
    $("resp-a").scrollTop = 0; $("resp-b").scrollTop = 0;
    $("work").dataset.pairId = String(p.id);
    show("work"); render();
  }

  async function loadNext() {
    const data = await api("GET", "/api/pairs/next?limit=1");
    setProgress(data.progress);
    if (data.pairs.length) showPair(data.pairs[0]);
    else { pair = null; show("done"); }
  }

  async function send(body) {
    if (busy || !pair) return;
    busy = true; render(); status("saving…");
    try {
      await api("POST", "/api/labels", Object.assign({pair_id: pair.id}, body));
      status("saved pair " + pair.id, "ok");
      busy = false;
      await loadNext();
    } catch (e) { busy = false; render(); if (e.message !== "401") status(e.message, "error"); }
  }

  function submit() {
    if ($("submit").disabled) return;
    const body = {choice, a_safe: !$("unsafe-a").checked, b_safe: !$("unsafe-b").checked};
    if (choice !== "tie") body.rating = rating;
    return send(body);
  }
  function skip() { return send({choice: "skip"}); }

  async function undo() {
    if (busy || !token()) return;
    busy = true; render(); status("undoing…");
    try {
      const data = await api("POST", "/api/labels/undo");
      busy = false;
      setProgress(data.progress);
      showPair(data.pair);
      const l = data.label;
      if (l.choice !== "skip") {
        choice = l.choice; rating = l.rating;
        $("unsafe-a").checked = l.a_safe === false; $("unsafe-b").checked = l.b_safe === false;
      }
      render();
      status("removed your label of pair " + l.pair_id + (l.choice === "skip" ? " (a skip)" : "") + "; label it again", "ok");
    } catch (e) { busy = false; render(); if (e.message !== "401") status(e.message, "error"); }
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY); pair = null;
    $("who").textContent = ""; $("progress").textContent = ""; $("progress-fill").style.width = "0";
    $("logout").classList.add("hidden"); $("undo").classList.add("hidden"); $("login-error").textContent = message || "";
    show("login"); $("token").focus();
  }

  async function start() {
    try {
      const me = await api("GET", "/api/me");
      $("who").textContent = me.name + (me.admin ? " (admin)" : "");
      $("logout").classList.remove("hidden"); $("undo").classList.remove("hidden");
      await loadNext();
    } catch (e) { if (e.message !== "401") status(e.message, "error"); }
  }

  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) { $("login-error").textContent = "Enter a token."; return; }
    sessionStorage.setItem(KEY, t); $("token").value = ""; start();
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("refresh").addEventListener("click", () => loadNext().catch((e) => status(e.message, "error")));
  for (const c of ["a", "b", "tie"]) $("choose-" + c).addEventListener("click", () => choose(c));
  for (const btn of document.querySelectorAll("#ratings button")) btn.addEventListener("click", () => rate(btn.dataset.rating));
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("undo").addEventListener("click", undo);

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.target instanceof HTMLInputElement && ev.target.type !== "checkbox") return;
    const k = ev.key.toLowerCase();
    if (k === "u" && !$("login").classList.contains("hidden")) return;
    if (k === "u") { ev.preventDefault(); undo(); return; }
    if ($("work").classList.contains("hidden")) return;
    let handled = true;
    if (k === "1") choose("a");
    else if (k === "2") choose("b");
    else if (k === "t") choose("tie");
    else if (k in RATING_KEYS) rate(RATING_KEYS[k]);
    else if (k === "z") toggleUnsafe("a");
    else if (k === "x") toggleUnsafe("b");
    else if (k === "s") skip();
    else if (k === "enter") submit();
    else handled = false;
    if (handled) ev.preventDefault();
  });

  if (token()) start(); else show("login");
})();
</script>
</body>
</html>
"""

ADMIN_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>align · labeling admin</title>
<style>
  :root { --fg:#1d2430; --muted:#5b6575; --line:#d8dde6; --bg:#f5f7fa; --card:#fff; --accent:#2457d6; --bad:#b42318; --good:#067647; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg); background:var(--bg); }
  header { display:flex; align-items:center; gap:16px; padding:10px 20px; background:var(--card); border-bottom:1px solid var(--line); }
  header h1 { font-size:17px; margin:0; font-weight:600; } header .spacer { flex:1; }
  main { max-width:1200px; margin:0 auto; padding:16px 20px 40px; }
  .hidden { display:none !important; }
  .card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; margin-bottom:14px; }
  #login { max-width:420px; margin:60px auto; }
  #login input { width:100%; padding:8px 10px; font:inherit; border:1px solid var(--line); border-radius:6px; }
  button { font:inherit; padding:7px 12px; border:1px solid var(--line); border-radius:6px; background:var(--card); cursor:pointer; }
  button.primary { background:var(--accent); color:#fff; border-color:var(--accent); }
  .meta { color:var(--muted); font-size:13px; }
  h2 { font-size:16px; margin:0 0 6px; }
  .bar { height:8px; background:var(--line); border-radius:4px; overflow:hidden; max-width:420px; margin:6px 0; }
  .bar div { height:100%; background:var(--accent); }
  .badge { display:inline-block; padding:0 8px; border-radius:10px; font-size:12px; background:#e8eefc; color:var(--accent); }
  .badge.closed { background:#e7f6ec; color:var(--good); }
  table { border-collapse:collapse; margin-top:8px; font-size:14px; font-variant-numeric: tabular-nums; }
  td, th { border:1px solid var(--line); padding:4px 10px; text-align:right; } th { background:#f0f2f6; }
  td:first-child, th:first-child { text-align:left; }
  dl { display:grid; grid-template-columns:max-content auto; gap:2px 14px; margin:8px 0 0; } dt { color:var(--muted); } dd { margin:0; }
  #error { color:var(--bad); }
</style>
</head>
<body>
<header>
  <h1>align · labeling admin</h1><span class="spacer"></span>
  <span id="who"></span>
  <button id="reload" class="hidden" type="button">Refresh</button>
  <button id="logout" class="hidden" type="button">Sign out</button>
</header>
<main>
  <form id="login" class="card hidden" autocomplete="off">
    <h2>Sign in</h2>
    <p class="meta">Paste an admin's token (<code>align label add-labeler NAME --admin</code>). It is kept in this tab only.</p>
    <input id="token" type="password" placeholder="token" aria-label="token">
    <div style="margin-top:10px"><button id="login-btn" class="primary" type="submit">Sign in</button></div>
    <div id="login-error" class="meta" style="color:var(--bad)"></div>
  </form>
  <div id="error"></div>
  <section id="rounds"></section>
</main>
<script>
"use strict";
(() => {
  const KEY = "align-label-token";
  const $ = (id) => document.getElementById(id);
  const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
  const pct = (v) => v === null || v === undefined ? "-" : Math.round(100 * v) + "%";
  const num = (v, d) => v === null || v === undefined ? "-" : v.toFixed(d);

  function token() { return sessionStorage.getItem(KEY); }
  function signOut(message) {
    sessionStorage.removeItem(KEY); $("rounds").replaceChildren(); $("who").textContent = "";
    for (const b of ["reload", "logout"]) $(b).classList.add("hidden");
    $("login-error").textContent = message || ""; $("login").classList.remove("hidden");
  }

  function roundCard(r) {
    const card = el("div", undefined, "card"); card.dataset.round = String(r.round);
    const h = el("h2", "Round " + r.round + " ");
    h.append(el("span", r.closed ? "closed" : "open", "badge" + (r.closed ? " closed" : "")));
    card.append(h);
    card.append(el("div", r.complete_pairs + " of " + r.pairs + " pairs complete (" + r.labels_per_pair +
      " labels each); " + r.labels + " labels, " + r.skips + " skips" + (r.gold_pairs ? "; " + r.gold_pairs + " gold pairs" : ""), "progress"));
    const bar = el("div", undefined, "bar"); const fill = el("div");
    fill.style.width = (r.pairs ? 100 * r.complete_pairs / r.pairs : 0) + "%"; bar.append(fill); card.append(bar);
    const a = r.agreement;
    if (!a) { card.append(el("div", "no labels yet", "meta")); return card; }
    const dl = el("dl");
    const kappa = a.cohen_kappa !== null ? ["Cohen's kappa", a.cohen_kappa] : ["Fleiss' kappa", a.fleiss_kappa];
    for (const [k, v] of [["agreement with the majority", pct(a.majority_agreement)],
                          [kappa[0], num(kappa[1], 2) + " (" + a.kappa_pairs + " pairs)"],
                          ["gold accuracy", pct(a.gold_accuracy) + " (" + a.gold_labels + " gold labels)"],
                          ["seconds per label", num(a.seconds_per_label, 1)],
                          ["ties", pct(a.tie_share)], ["skips", pct(a.skip_share)]]) {
      dl.append(el("dt", k), el("dd", v));
    }
    card.append(dl);
    const table = el("table", undefined, "labelers");
    const head = el("tr");
    for (const t of ["labeler", "labels", "skips", "agrees with the others' majority", "gold accuracy", "s per label"]) head.append(el("th", t));
    table.append(head);
    for (const [name, l] of Object.entries(a.labelers)) {
      const tr = el("tr");
      for (const t of [name, String(l.labels), String(l.skips), pct(l.majority_agreement) + " of " + l.compared,
                       pct(l.gold_accuracy) + " of " + l.gold_labels, num(l.seconds_per_label, 1)]) tr.append(el("td", t));
      table.append(tr);
    }
    card.append(table);
    return card;
  }

  async function load() {
    $("error").textContent = "";
    const headers = {"Authorization": "Bearer " + token()};
    const me = await fetch("/api/me", {headers});
    if (me.status === 401) { signOut("Your token was not accepted; sign in again."); return; }
    const who = await me.json();
    $("who").textContent = who.name + (who.admin ? " (admin)" : "");
    $("login").classList.add("hidden"); for (const b of ["reload", "logout"]) $(b).classList.remove("hidden");
    const res = await fetch("/api/admin/quality", {headers});
    const data = await res.json().catch(() => null);
    if (!res.ok) { $("error").textContent = res.status + ": " + ((data && data.detail) || res.statusText); return; }
    const box = $("rounds"); box.replaceChildren();
    if (!data.rounds.length) box.append(el("div", "no rounds yet", "card meta"));
    for (const r of data.rounds) box.append(roundCard(r));
  }

  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) { $("login-error").textContent = "Enter a token."; return; }
    sessionStorage.setItem(KEY, t); $("token").value = ""; load();
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("reload").addEventListener("click", () => load());
  setInterval(() => { if (token()) load(); }, 30000);
  if (token()) load(); else $("login").classList.remove("hidden");
})();
</script>
</body>
</html>
"""
