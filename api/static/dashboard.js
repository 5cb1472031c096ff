// textgen live dashboard: polls /metrics (Prometheus text) and plots it. No numbers of its own:
// gauges are shown as scraped, rates and percentiles are computed from counter and histogram
// deltas between scrapes, with Prometheus' histogram_quantile interpolation.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const INTERVAL_MS = Number(params.get("interval") || 2000);
  const WINDOW_S = Number(params.get("window") || 300);
  const COLORS = ["#1f77b4", "#ff7f0e", "#d62728"];
  const QUANTILES = [0.5, 0.9, 0.99];

  const PANELS = [
    {id: "queue", title: "Queue length", metric: "tgi_queue_size", kind: "gauge", unit: "requests"},
    {id: "batch", title: "Running batch", metric: "tgi_batch_current_size", kind: "gauge", unit: "requests"},
    {id: "kv", title: "KV cache use", metric: "textgen_kv_cache_usage", kind: "gauge", unit: "%", scale: 100},
    {id: "prefix", title: "Prefix cache hit rate", metric: "textgen_prefix_cache_hit_rate", kind: "gauge", unit: "%", scale: 100},
    {id: "tokens", title: "Generated tokens/s", metric: "textgen_generation_tokens", kind: "rate", unit: "tok/s"},
    {id: "ttft", title: "Time to first token", metric: "textgen_time_to_first_token_seconds", kind: "quantiles", unit: "ms", scale: 1000},
    {id: "itl", title: "Inter-token latency", metric: "textgen_inter_token_latency_seconds", kind: "quantiles", unit: "ms", scale: 1000},
    {id: "requests", title: "Requests succeeded", metric: "tgi_request_success", kind: "total", unit: "total"},
    {id: "generated", title: "Tokens generated", metric: "textgen_generation_tokens", kind: "total", unit: "total"},
  ];

  // -- Prometheus text format -------------------------------------------------------------
  function parseMetrics(text) {
    const samples = {};  // name -> [{labels, value}]
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
      if (!m) continue;
      const labels = {};
      for (const pair of (m[3] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
      (samples[m[1]] = samples[m[1]] || []).push({labels, value: parseFloat(m[4])});
    }
    return samples;
  }

  function scalar(samples, name) {
    const s = samples[name];
    return s && s.length ? s[0].value : NaN;
  }

  function buckets(samples, name) {  // [[le, cumulative count]] sorted by le
    return (samples[name + "_bucket"] || [])
      .map(s => [s.labels.le === "+Inf" ? Infinity : parseFloat(s.labels.le), s.value])
      .sort((a, b) => a[0] - b[0]);
  }

  // Prometheus' histogram_quantile over cumulative bucket counts.
  function quantile(q, cumulative) {
    if (!cumulative.length) return NaN;
    const total = cumulative[cumulative.length - 1][1];
    if (!(total > 0)) return NaN;
    const rank = q * total;
    let i = cumulative.findIndex(([, count]) => count >= rank);
    if (cumulative[i][0] === Infinity) return i > 0 ? cumulative[i - 1][0] : NaN;
    const lower = i > 0 ? cumulative[i - 1][0] : 0;
    const below = i > 0 ? cumulative[i - 1][1] : 0;
    const inBucket = cumulative[i][1] - below;
    if (inBucket <= 0) return cumulative[i][0];
    return lower + (cumulative[i][0] - lower) * (rank - below) / inBucket;
  }

  function delta(latest, base) {  // bucket counts observed between two scrapes
    return latest.map(([le, count], i) => [le, count - (base[i] ? base[i][1] : 0)]);
  }

  // -- state ------------------------------------------------------------------------------
  const state = {scrapes: [], series: {}, values: {}};
  window.textgenDashboard = state;  // read by the browser test

  function record(id, t, values) {
    const s = (state.series[id] = state.series[id] || []);
    s.push({t, values});
    while (s.length && s[0].t < t - WINDOW_S) s.shift();
  }

  function update(samples, t) {
    state.scrapes.push({t, samples});
    while (state.scrapes.length > 1 && state.scrapes[0].t < t - WINDOW_S) state.scrapes.shift();
    const base = state.scrapes[0].samples, prev = state.scrapes[state.scrapes.length - 2];
    for (const p of PANELS) {
      let values;
      if (p.kind === "gauge" || p.kind === "total") values = [scalar(samples, p.metric)];
      else if (p.kind === "rate") {
        values = [prev ? (scalar(samples, p.metric) - scalar(prev.samples, p.metric)) / (t - prev.t) : NaN];
      } else {
        const window = delta(buckets(samples, p.metric), buckets(base, p.metric));
        values = QUANTILES.map(q => quantile(q, window));
      }
      state.values[p.id] = values;
      record(p.id, t, values);
    }
  }

  // -- rendering --------------------------------------------------------------------------
  function fmt(v, p) {
    if (!Number.isFinite(v)) return "–";
    const x = v * (p.scale || 1);
    return Math.abs(x) >= 100 || Number.isInteger(x) ? x.toFixed(0) : x.toFixed(x < 1 ? 3 : 1);
  }

  function build() {
    const root = document.getElementById("panels");
    for (const p of PANELS) {
      const div = document.createElement("div");
      div.className = "panel";
      div.id = "panel-" + p.id;
      const labels = p.kind === "quantiles" ? QUANTILES.map((q, i) =>
        `<span style="color:${COLORS[i]}">p${q * 100} <b data-panel="${p.id}" data-index="${i}" class="q">–</b></span>`).join("")
        : "";
      div.innerHTML = `<h2>${p.title}</h2>` + (p.kind === "quantiles"
        ? `<div class="legend">${labels}<small>${p.unit}, last ${WINDOW_S / 60} min</small></div>`
        : `<div class="value"><span data-panel="${p.id}" data-index="0">–</span><small>${p.unit}</small></div>`)
        + `<svg viewBox="0 0 300 90" preserveAspectRatio="none" data-plot="${p.id}"></svg>`;
      root.appendChild(div);
    }
  }

  function plot(p, t) {
    const svg = document.querySelector(`svg[data-plot="${p.id}"]`);
    const points = state.series[p.id] || [];
    const finite = points.flatMap(pt => pt.values).filter(Number.isFinite);
    const top = Math.max(1e-9, ...finite) * 1.1;
    const lines = (points[0] ? points[0].values : [0]).map((_, i) => {
      const coords = points.filter(pt => Number.isFinite(pt.values[i]))
        .map(pt => `${(300 * (1 - (t - pt.t) / WINDOW_S)).toFixed(1)},${(88 - 86 * pt.values[i] / top).toFixed(1)}`);
      return `<polyline fill="none" stroke="${COLORS[i]}" stroke-width="1.5" points="${coords.join(" ")}"/>`;
    });
    svg.innerHTML = lines.join("") + `<text x="2" y="10" font-size="9" fill="#888">${fmt(top / 1.1, p)}</text>`;
  }

  function render(t) {
    for (const p of PANELS) {
      document.querySelectorAll(`[data-panel="${p.id}"]`).forEach(el => {
        const v = state.values[p.id][Number(el.dataset.index)];
        el.textContent = fmt(v, p);
        el.dataset.value = String(v);
      });
      plot(p, t);
    }
  }

  async function poll() {
    const status = document.getElementById("status");
    try {
      const response = await fetch("/metrics", {cache: "no-store"});
      const t = performance.now() / 1000;
      update(parseMetrics(await response.text()), t);
      render(t);
      state.polls = (state.polls || 0) + 1;
      status.textContent = `updated ${new Date().toLocaleTimeString()} · every ${INTERVAL_MS / 1000} s · ` +
        `window ${WINDOW_S / 60} min · ${state.polls} scrapes`;
      status.dataset.polls = String(state.polls);
    } catch (err) {
      status.textContent = "cannot read /metrics: " + err;
    }
    setTimeout(poll, INTERVAL_MS);
  }

  build();
  poll();
})();
