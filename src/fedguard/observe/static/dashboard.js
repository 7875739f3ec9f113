// fedguard dashboard: polls /api/runs and redraws. Run folders are read by the server; this
// script only draws what it gets (plotly.js, served by the same server).
"use strict";

const POLL_MS = Number(document.body.dataset.pollMs) || 1000;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];
const CONFIG = { displayModeBar: false, responsive: true };

function text(value) { return value === null || value === undefined ? "–" : String(value); }
function esc(value) {
  return text(value).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function label(run, i) { return run.name + (i > 0 ? "" : ""); }

// One line per run: the rows of `rows` whose `key` is a number.
function series(runs, key, name, dash) {
  return runs.map((run, i) => {
    const rows = run.metrics.filter(r => typeof r[key] === "number");
    return {
      x: rows.map(r => r.round), y: rows.map(r => r[key]), type: "scatter", mode: "lines+markers",
      name: (name ? name + " " : "") + label(run, i), line: { color: COLORS[i % COLORS.length], dash: dash || "solid" },
      marker: { size: 4 },
    };
  });
}

function layout(title, ytitle, extra) {
  return Object.assign({
    title: { text: title, font: { size: 13 } }, margin: { l: 55, r: 10, t: 30, b: 70 },
    xaxis: { title: { text: "round", standoff: 4 }, tickformat: "d" }, yaxis: { title: { text: ytitle } },
    legend: { orientation: "h", y: -0.32 }, uirevision: title,
  }, extra || {});
}

// An empty chart says why instead of drawing empty axes.
function draw(id, traces, lay, empty) {
  const hasData = traces.some(t => t.x && t.x.length);
  if (!hasData) {
    lay = Object.assign({}, lay, {
      xaxis: { visible: false }, yaxis: { visible: false },
      annotations: [{ text: empty || "no data yet", showarrow: false, font: { size: 13, color: "#6b7280" } }],
    });
  }
  Plotly.react(id, traces, lay, CONFIG);
}

function runCard(run, i) {
  const st = run.status || {};
  const planned = st.rounds_planned || (run.summary && run.summary.rounds_planned) || null;
  const done = st.rounds_done !== undefined ? st.rounds_done
    : (run.metrics.length ? run.metrics[run.metrics.length - 1].round : 0);
  const state = st.state || (run.summary ? run.summary.status : (run.is_run ? "unknown" : "waiting"));
  const cur = st.current;
  const pct = planned ? Math.min(100, 100 * done / planned) : 0;
  const priv = st.privacy || {};
  let eps = "";
  if (priv.epsilon !== null && priv.epsilon !== undefined) {
    const budget = priv.max_epsilon;
    const share = budget ? Math.min(100, 100 * priv.epsilon / budget) : 0;
    eps = `<div class="kv">ε spent <b class="epsilon">${priv.epsilon.toFixed(3)}</b>` +
      (budget ? ` of budget ${budget} (δ ${text(priv.delta)})</div><div class="bar eps"><div style="width:${share}%"></div></div>` : ` (no budget set)</div>`);
  }
  const last = st.last || {};
  const rej = run.metrics.filter(r => r.aggregate_rejected).map(r => r.round);
  const totalRejected = run.metrics.reduce((a, r) => a + (r.clients_rejected || 0), 0);
  const totalFailed = run.metrics.reduce((a, r) => a + (r.clients_failed || 0), 0);
  const totalLeftOut = run.metrics.reduce((a, r) => a + (r.clients_left_out || 0), 0);
  // a rule that picks whole updates (Krum, Multi-Krum, Bulyan) counts the updates it left out
  const selecting = run.metrics.filter(r => typeof r.clients_left_out === "number");
  const rule = selecting.length ? selecting[selecting.length - 1].robust_rule : null;
  const problems = (run.problems || []).map(p => `<div>${esc(p)}</div>`).join("");
  const inRound = cur && cur.phase === "training" ? ` · round ${cur.round} in progress` : "";
  return `<div class="run" data-run="${i}">
    <h2 style="color:${COLORS[i % COLORS.length]}">${esc(run.name)}<span class="state ${esc(state)}">${esc(state)}</span></h2>
    <div class="kv">round <b class="round-counter" id="round-${i}">${done}</b> / <span class="rounds-planned">${text(planned)}</span>${inRound}</div>
    <div class="bar"><div style="width:${pct}%"></div></div>
    <div class="kv">time left ${duration(st.seconds_left)} · ${st.seconds_per_round ? st.seconds_per_round.toFixed(2) + " s/round" : ""}</div>
    ${eps}
    <div class="kv">last round: ${text(last.clients_completed)} used of ${text(last.clients_sampled)} sampled · bytes ↑ ${text(last.bytes_up)} ↓ ${text(last.bytes_down)}</div>
    <div class="kv">all rounds: ${totalFailed} client failures, ${totalRejected} rejected updates${rule ? `, <span class="left-out-total">${totalLeftOut}</span> left out by ${esc(rule)}` : ""}${rej.length ? ", aggregate refused in rounds " + rej.join(", ") : ""}</div>
    ${st.error ? `<div class="problems">${esc(st.error)}</div>` : ""}
    <div class="problems">${problems}</div>
    <div class="kv" style="font-size:11px;color:#6b7280">${esc(run.path)}</div>
  </div>`;
}

// What the round's robust rule did to one client: left its update out, or cut a share of its
// coordinates (a trimmed mean); empty when the rule said nothing of it.
function verdict(c) {
  if (c.left_out_by) return "left out by " + c.left_out_by;
  if (c.trimmed_share !== null && c.trimmed_share !== undefined) return (100 * c.trimmed_share).toFixed(1) + "% of coordinates trimmed";
  return "";
}

function clientTable(run, i) {
  const cur = run.status && run.status.current;
  if (!cur || !cur.clients) return "";
  const isAsync = run.status.mode === "async";
  const rows = cur.clients.map(c => `<tr class="client-row"><td>${c.client}</td><td class="st-${esc(c.status)}">${esc(c.status)}</td>` +
    `<td>${c.seconds === null || c.seconds === undefined ? "–" : c.seconds.toFixed(3) + " s"}</td><td>${esc(c.reason || "")}</td>` +
    `<td class="verdict">${esc(verdict(c))}</td>` + (isAsync ? `<td>${text(c.staleness)}</td>` : "") + `</tr>`).join("");
  const what = isAsync ? `tasks of buffer ${cur.round}` : `clients of round ${cur.round}`;
  const rule = cur.robust_rule ? ` · rule ${esc(cur.robust_rule)}` +
    (cur.clients_left_out !== null && cur.clients_left_out !== undefined ? `, ${cur.clients_left_out} left out` : ", no whole update left out") : "";
  return `<div class="panel" id="clients-${i}"><h3>${esc(run.name)}: ${what} (${esc(cur.phase)})${rule}</h3>
    <table><tr><th>client</th><th>status</th><th>latency</th><th>reason</th><th>robust rule</th>${isAsync ? "<th>staleness</th>" : ""}</tr>${rows}</table></div>`;
}

function contributionTraces(runs) {
  const traces = [];
  runs.forEach((run, i) => {
    const c = run.contributions && run.contributions.cumulative;
    if (!c) return;
    const ids = Object.keys(c);
    traces.push({ x: ids.map(k => "client " + k), y: ids.map(k => c[k]), type: "bar", name: run.name,
      marker: { color: COLORS[i % COLORS.length] } });
  });
  return traces;
}

function partitionTraces(runs) {
  const run = runs.find(r => r.partition && r.partition.clients);
  if (!run) return [];
  const p = run.partition;
  const names = p.class_names || [];
  return names.map((cls, k) => ({
    x: p.clients.map(c => String(c.id)), y: p.clients.map(c => (c.label_counts || [])[k] || 0),
    type: "bar", name: "class " + cls,
  }));
}

function render(data) {
  const began = performance.now();
  const runs = data.runs;
  document.getElementById("runs").innerHTML = runs.map(runCard).join("");
  document.getElementById("clients").innerHTML = runs.map(clientTable).join("");
  draw("chart-accuracy", series(runs, "test_accuracy"), layout("test accuracy", "accuracy"));
  draw("chart-loss", series(runs, "test_loss", "test").concat(series(runs, "train_loss", "train", "dot")), layout("loss", "loss"));
  draw("chart-auc", series(runs, "test_auc"), layout("test AUC", "AUC"), "no AUC in these runs");
  const epsTraces = series(runs, "epsilon");
  runs.forEach((run, i) => {
    const budget = run.status && run.status.privacy && run.status.privacy.max_epsilon;
    const rounds = run.status && run.status.rounds_planned;
    if (budget && rounds) {
      epsTraces.push({ x: [1, rounds], y: [budget, budget], mode: "lines", name: "budget " + run.name,
        line: { dash: "dash", color: COLORS[i % COLORS.length] } });
    }
  });
  draw("chart-epsilon", epsTraces, layout("privacy: epsilon spent", "ε"), "no differential privacy in these runs");
  draw("chart-bytes", series(runs, "bytes_up", "up").concat(series(runs, "bytes_down", "down", "dot")), layout("bytes per round", "bytes"));
  draw("chart-clients", series(runs, "clients_completed", "used").concat(series(runs, "clients_failed", "failed", "dot"), series(runs, "clients_rejected", "rejected", "dash"), series(runs, "clients_left_out", "left out by the rule", "dashdot")), layout("clients per round", "clients"));
  draw("chart-contributions", contributionTraces(runs), layout("contribution scores (cumulative)", "score", { xaxis: {} }), "no contribution scores ([contribution] is off)");
  draw("chart-partition", partitionTraces(runs), layout("partition: examples per client and class", "examples", { barmode: "stack", xaxis: { title: { text: "client" }, type: "category" } }), "no partition.json yet");
  document.getElementById("updated").textContent = "updated " + new Date(data.time * 1000).toLocaleTimeString();
  // for tests and the benchmark: polls drawn, when the first one was (ms after navigation
  // start), how long the last redraw took, and the data drawn
  const before = window.fedguardDashboard;
  const now = performance.now();
  window.fedguardDashboard = {
    polls: (before ? before.polls : 0) + 1,
    firstRenderMs: before ? before.firstRenderMs : now,
    lastRenderMs: now - began,
    data: data,
  };
}

let lastBody = null;  // a poll that brings nothing new redraws nothing

async function poll() {
  try {
    const response = await fetch("/api/runs", { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const body = await response.text();
    const data = JSON.parse(body);
    const runsPart = body.slice(body.indexOf('"runs"'));
    if (runsPart !== lastBody) {
      render(data);
      lastBody = runsPart;
    } else {
      document.getElementById("updated").textContent = "updated " + new Date(data.time * 1000).toLocaleTimeString();
    }
  } catch (err) {
    document.getElementById("updated").textContent = "cannot reach the dashboard server (" + err.message + "); retrying";
  }
  setTimeout(poll, POLL_MS);
}

poll();
