// dicomnode admin: a little plain JavaScript (no build step). Every state change goes through the REST API
// with the session's CSRF token in the X-CSRF-Token header.
"use strict";

const csrfToken = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

function esc(s) {
  return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

async function api(method, url, body) {
  const opts = { method, headers: { "Accept": "application/json", "X-CSRF-Token": csrfToken() }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(url, opts);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    let detail = data && data.detail !== undefined ? data.detail : resp.statusText;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    const err = new Error(`${resp.status}: ${detail}`);
    err.status = resp.status;
    err.data = data;
    throw err;
  }
  return data;
}

let toastTimer = null;
function toast(text, bad) {
  const t = document.getElementById("toast");
  if (!t) return;
  t.textContent = text;
  t.className = "toast show" + (bad ? " bad" : "");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.className = "toast"; }, bad ? 6000 : 2500);
}

// Buttons: <button data-api="POST /api/..." [data-body='{...}'] [data-confirm="..."] [data-probe=id] [data-show=id]>
document.addEventListener("click", async (ev) => {
  const btn = ev.target.closest("[data-api]");
  if (!btn || btn.disabled) return;
  ev.preventDefault();
  if (btn.dataset.confirm && !window.confirm(btn.dataset.confirm)) return;
  const [method, url] = btn.dataset.api.split(" ");
  const body = btn.dataset.body ? JSON.parse(btn.dataset.body) : (method === "POST" ? undefined : undefined);
  btn.disabled = true;
  try {
    const data = await api(method, url, body);
    if (btn.dataset.probe) {
      const span = document.getElementById(btn.dataset.probe);
      span.className = "probe " + (data.ok ? "ok" : "bad");
      span.textContent = (data.ok ? "✓ " : "✗ ") + data.message + ` (${data.elapsed_s.toFixed(2)} s)`;
      btn.disabled = false;
      return;
    }
    if (btn.dataset.show) {
      const out = document.getElementById(btn.dataset.show);
      out.hidden = false;
      out.textContent = `Token for ${data.username} (shown once):\n${data.token}`;
      btn.disabled = false;
      return;
    }
    toast("Done.");
    setTimeout(() => window.location.reload(), 500);
  } catch (e) {
    toast(e.message, true);
    btn.disabled = false;
  }
});

// ---- Rules page -----------------------------------------------------------------------------------------

function initRules() {
  const editor = document.getElementById("rules-text");
  if (!editor) return;
  const status = document.getElementById("rules-status");
  const list = document.getElementById("rules-problems");
  const save = document.getElementById("rules-save");
  let timer = null;
  let seq = 0;
  let valid = false;

  async function validate() {
    const mine = ++seq;
    try {
      const r = await api("POST", "/api/rules/validate", { yaml: editor.value });
      if (mine !== seq) return;  // an older answer arriving late
      valid = r.valid;
      editor.classList.toggle("invalid", !r.valid);
      editor.classList.toggle("valid", r.valid);
      status.className = "status-line " + (r.valid ? "ok" : "bad");
      status.textContent = r.valid ? "✓ Valid rules" : `✗ ${r.problems.length} problem(s): nothing can be saved until fixed`;
      list.innerHTML = r.problems.map((p) => {
        const loc = [p.rule ? `rule ${p.rule}` : "", p.condition ? `condition ${p.condition}` : "", p.field || "", p.line ? `line ${p.line}` : ""]
          .filter(Boolean).join(" · ");
        return `<li>${loc ? `<span class="loc">${esc(loc)}</span>` : ""}${esc(p.message)}</li>`;
      }).join("");
      if (save) save.disabled = !r.valid;
    } catch (e) {
      status.className = "status-line bad";
      status.textContent = "Could not validate: " + e.message;
    }
  }
  editor.addEventListener("input", () => {
    if (save) save.disabled = true;
    status.className = "status-line muted";
    status.textContent = "Checking…";
    clearTimeout(timer);
    timer = setTimeout(validate, 350);
  });
  editor.addEventListener("keydown", (e) => {  // a tab key inserts two spaces (YAML has no tabs)
    if (e.key === "Tab") {
      e.preventDefault();
      const s = editor.selectionStart;
      editor.setRangeText("  ", s, editor.selectionEnd, "end");
      editor.dispatchEvent(new Event("input"));
    }
  });
  validate();

  if (save) {
    save.addEventListener("click", async () => {
      if (!valid) return;
      save.disabled = true;
      try {
        const r = await api("PUT", "/api/rules", { yaml: editor.value, comment: document.getElementById("rules-comment").value || null });
        toast(`Saved as version ${r.version}; it applies to the next routed study.`);
        setTimeout(() => window.location.reload(), 800);
      } catch (e) {
        toast(e.message, true);
        if (e.data && e.data.problems) validate();
        save.disabled = false;
      }
    });
  }

  const pick = document.getElementById("dry-study");
  const uid = document.getElementById("dry-uid");
  const run = document.getElementById("dry-run");
  const out = document.getElementById("dry-result");
  pick.addEventListener("change", () => { if (pick.value) uid.value = pick.value; });
  async function dryRun() {
    const study = (uid.value || pick.value).trim();
    if (!study) { toast("Pick a study or paste a Study Instance UID.", true); return; }
    out.innerHTML = '<p class="muted">Running…</p>';
    try {
      const r = await api("POST", "/api/rules/explain", { study_instance_uid: study, rules: editor.value });
      const n = r.series.filter((s) => s.selected).length;
      out.innerHTML = `<p><b>${n}</b> of ${r.series.length} series selected with the rules in the editor.</p>` +
        r.series.map((s) => {
          const meta = [s.series_number !== null && s.series_number !== undefined ? `#${s.series_number}` : "", s.images !== null ? `${s.images} images` : "",
            s.slice_thickness ? `${s.slice_thickness} mm` : "", s.kernel || ""].filter(Boolean).join(" · ");
          const reasons = s.reasons.map((x) => {
            const cls = /FAIL|not selected/.test(x) ? "fail" : (/: pass/.test(x) ? "pass" : "");
            return `<li class="${cls}">${esc(x)}</li>`;
          }).join("");
          return `<div class="dry-series ${s.selected ? "selected" : ""}" data-series="${esc(s.series_instance_uid)}" data-selected="${s.selected}">
            <header><span class="badge ${s.selected ? "st-ok" : "st-muted"}">${s.selected ? "selected" : "not selected"}</span>
            <span class="desc">${esc(s.series_description || "(no description)")}</span><span class="meta">${esc(meta)}</span>
            <span class="meta">rule: ${esc(s.rule || "fallback")} → ${esc(s.action)}</span></header>
            <code class="uid">${esc(s.series_instance_uid)}</code>
            <details ${s.selected ? "open" : ""}><summary>${s.reasons.length} reasons</summary><ul class="reasons">${reasons}</ul></details></div>`;
        }).join("");
    } catch (e) {
      out.innerHTML = `<div class="alert alert-bad">${esc(e.message)}</div>`;
    }
  }
  run.addEventListener("click", dryRun);
  if (uid.value) dryRun();
}

// ---- Health page ----------------------------------------------------------------------------------------

async function initHealth() {
  const ready = document.getElementById("ready-table");
  if (!ready) return;
  try {
    const resp = await fetch("/api/ready", { headers: { "Accept": "application/json" } });
    const r = await resp.json();
    const rows = [`<tr><td><b>overall</b></td><td><span class="badge ${r.status === "ready" ? "st-ok" : "st-bad"}">${esc(r.status)}</span></td></tr>`];
    for (const [name, why] of Object.entries(r.problems || {})) {
      rows.push(`<tr><td>${esc(name)}</td><td><span class="badge st-bad">not ready</span> ${esc(why)}</td></tr>`);
    }
    if (r.status === "ready") rows.push('<tr><td colspan="2" class="muted">Every readiness check of this process passes.</td></tr>');
    ready.innerHTML = `<tbody>${rows.join("")}</tbody>`;
  } catch (e) {
    ready.innerHTML = `<tbody><tr><td class="bad">${esc(e.message)}</td></tr></tbody>`;
  }
  const mt = document.getElementById("metrics-table");
  try {
    const text = await (await fetch("/metrics")).text();
    const wanted = /^(dicomnode_[a-z_]+?)(_total)?(\{[^}]*\})? ([0-9.eE+-]+)$/;
    const rows = [];
    for (const line of text.split("\n")) {
      if (line.startsWith("#") || line.includes("_bucket") || line.includes("_created")) continue;
      const m = line.match(wanted);
      if (m) rows.push(`<tr><td><code>${esc(m[1] + (m[2] || ""))}</code></td><td><code>${esc(m[3] || "")}</code></td><td class="num">${esc(Number(m[4]).toLocaleString())}</td></tr>`);
    }
    mt.innerHTML = `<thead><tr><th>Metric</th><th>Labels</th><th class="num">Value</th></tr></thead><tbody>${rows.join("")}</tbody>`;
  } catch (e) {
    mt.innerHTML = `<tbody><tr><td class="bad">${esc(e.message)}</td></tr></tbody>`;
  }
}

// ---- Users page -----------------------------------------------------------------------------------------

function initUsers() {
  const form = document.getElementById("user-form");
  if (!form) return;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    try {
      await api("POST", "/api/users", { username: f.get("username"), password: f.get("password"), role: f.get("role") });
      toast("User added.");
      setTimeout(() => window.location.reload(), 500);
    } catch (e) {
      toast(e.message, true);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => { initRules(); initHealth(); initUsers(); });
