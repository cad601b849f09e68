// majordome's dashboard script: the pages are rendered by the server and
// work without it; this makes them live. It follows the bus's events
// (`/ui/events`, Server-Sent Events) to update values and statuses in
// place, sends forms without leaving the page, and refreshes the bus
// statistics and plugin logs while they are shown.
"use strict";

(function () {
  const $$ = (selector, root) => Array.from((root || document).querySelectorAll(selector));

  // The same words and rounding as the server's `format_value`.
  const UNITS = { degC: "°C", degF: "°F", percent: "%", level: "" };
  function formatValue(level, unit) {
    if (unit === "level" && typeof level === "number") return level > 0 ? "On" : "Off";
    if (typeof level === "number") {
      return (Math.round(level * 100) / 100).toLocaleString(undefined, { maximumFractionDigits: 2 });
    }
    if (level === null || level === undefined) return "–";
    return typeof level === "string" ? level : JSON.stringify(level);
  }
  function unitText(unit) {
    return unit in UNITS ? UNITS[unit] : unit || "";
  }

  // A short message at the bottom of the page.
  let toastTimer = null;
  function toast(message, failed) {
    let box = document.getElementById("toast");
    if (!box) {
      box = document.createElement("div");
      box.id = "toast";
      box.setAttribute("role", "status");
      box.setAttribute("aria-live", "polite");
      document.body.appendChild(box);
    }
    box.textContent = message;
    box.className = failed ? "show error" : "show";
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.className = failed ? "error" : ""; }, failed ? 6000 : 2500);
  }

  // One device value changed: its text, its switch, its slider.
  function showValue(uuid, quantity, subject, level) {
    const selector = quantity
      ? `[data-value="${CSS.escape(uuid + "/" + quantity)}"]`
      : `[data-device="${CSS.escape(uuid)}"] [data-event="${CSS.escape(subject)}"]`;
    for (const element of $$(selector)) {
      const text = formatValue(level, element.dataset.unit);
      if (element.textContent !== text) {
        element.textContent = text;
        element.classList.remove("changed");
        void element.offsetWidth; // restarts the animation
        element.classList.add("changed");
      }
      quantity = quantity || element.dataset.value.split("/")[1];
    }
    if (!quantity) return;
    const key = CSS.escape(uuid + "/" + quantity);
    for (const button of $$(`button[data-toggle="${key}"]`)) {
      const on = typeof level === "number" && level > 0;
      button.setAttribute("aria-checked", on ? "true" : "false");
      const command = button.form && button.form.elements.command;
      if (command) command.value = on ? "off" : "on";
    }
    for (const slider of $$(`input[data-level="${key}"]`)) {
      if (document.activeElement !== slider && typeof level === "number") slider.value = level;
    }
    for (const card of $$(`[data-device="${CSS.escape(uuid)}"]`)) markStale(card, false);
  }

  function markStale(card, stale) {
    card.dataset.stale = stale ? "true" : "false";
    const badge = card.querySelector(".badge.stale");
    if (badge) badge.hidden = !stale;
  }

  // The manager's client list: each client's status, pid and buttons.
  function showClients(clients) {
    for (const row of $$("[data-client]")) {
      const client = clients[row.dataset.client];
      if (!client) continue;
      for (const badge of $$(".status", row)) {
        badge.textContent = client.status;
        badge.dataset.status = client.status;
      }
      for (const pid of $$("[data-field=pid]", row)) pid.textContent = client.pid || "–";
      row.dataset.pid = client.pid || "";
      refreshButtons(row);
    }
  }

  // The bus's events, as long as the page is open; the browser reconnects
  // by itself after a failure.
  function follow() {
    const live = document.querySelector(".live");
    if (!window.EventSource) return;
    const source = new EventSource("/ui/events");
    // Events this page did not get (it fell behind, or the stream broke
    // off) leave it showing old values: it is drawn again.
    let broken = false;
    const catchUp = (why) => { toast(why); setTimeout(() => location.reload(), 800); };
    source.onopen = () => {
      if (live) { live.dataset.state = "on"; live.title = "Live: following the bus"; }
      if (broken) catchUp("Live again: drawing the page afresh");
    };
    source.onerror = () => {
      broken = true;
      if (live) { live.dataset.state = "off"; live.title = "Not live: reconnecting"; }
    };
    source.addEventListener("overflow", (message) => {
      catchUp(`This page missed ${message.data} updates: drawing it afresh`);
    });
    source.onmessage = (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      const data = event.data || {};
      if (event.category === "client.list") {
        showClients(data);
      } else if (event.category === "event.device.stale" && data.uuid) {
        for (const card of $$(`[data-device="${CSS.escape(data.uuid)}"]`)) markStale(card, data.stale !== false);
      } else if (event.category === "device.update") {
        if (document.body.dataset.page === "home") toast("The devices changed: reload to see them all");
      } else if (data.uuid && data.data && "level" in data.data) {
        showValue(data.uuid, data.data.quantity, event.category, data.data.level);
      }
    };
  }

  // Forms are sent in the background; the answer is said in a toast.
  async function send(form, submitter) {
    // A start or stop holds both buttons of its client until it is
    // answered: a plugin that said "stopped" may not have exited yet.
    const row = form.closest("[data-client]");
    if (row) row.dataset.busy = "true";
    const buttons = $$("button", row || form);
    buttons.forEach((b) => (b.disabled = true));
    const body = new URLSearchParams(new FormData(form, submitter));
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body,
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      let answer = {};
      try { answer = await response.json(); } catch (e) { /* not JSON */ }
      const message = answer.message || (response.ok ? "Done" : `Failed (HTTP ${response.status})`);
      toast(message, !response.ok || answer.ok === false);
      if (response.ok && answer.ok !== false && form.dataset.after === "reload") {
        setTimeout(() => location.reload(), 600);
      }
    } catch (e) {
      toast("The hub did not answer: " + e.message, true);
    } finally {
      buttons.forEach((b) => (b.disabled = false));
      if (row) {
        delete row.dataset.busy;
        refreshButtons(row);
      }
    }
  }
  // Start is for a client that does not run, Stop for one that does;
  // neither while one of them is being answered.
  function refreshButtons(row) {
    const badge = row.querySelector(".status");
    if (!badge || row.dataset.busy) return;
    // A process that said "stopped" runs until it has exited (its pid).
    const running =
      ["alive", "starting", "not-configured", "stop-request"].includes(badge.dataset.status) || !!row.dataset.pid;
    for (const button of $$("button[data-when=running]", row)) button.disabled = !running;
    for (const button of $$("button[data-when=stopped]", row)) button.disabled = running;
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!form.matches("form[data-async]")) return;
    event.preventDefault();
    send(form, event.submitter);
  });
  document.addEventListener("change", (event) => {
    const input = event.target;
    if (input.matches("form[data-autosubmit] input[type=range]")) input.form.requestSubmit();
  });
  document.addEventListener("input", (event) => {
    const input = event.target;
    const shown = input.matches("input[type=range]") && input.form && input.form.querySelector("output");
    if (shown) shown.textContent = input.value;
  });

  // "3 min ago" for every <time data-time>, kept current.
  function ago() {
    const now = Date.now() / 1000;
    for (const element of $$("time[data-time]")) {
      const seconds = Math.max(0, now - Number(element.dataset.time));
      let text;
      if (seconds < 5) text = "just now";
      else if (seconds < 90) text = `${Math.round(seconds)} s ago`;
      else if (seconds < 5400) text = `${Math.round(seconds / 60)} min ago`;
      else if (seconds < 129600) text = `${Math.round(seconds / 3600)} h ago`;
      else text = `${Math.round(seconds / 86400)} days ago`;
      element.textContent = text;
    }
  }

  // The bus page: the statistics again every two seconds, with rates.
  let previous = null;
  async function pollStatus() {
    try {
      const response = await fetch("/api/status", { headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const status = await response.json();
      const now = performance.now() / 1000;
      const services = (status.broker && status.broker.services) || {};
      for (const [name, service] of Object.entries(services)) {
        for (const cell of $$(`[data-stat^="${CSS.escape(name)}/"]`)) {
          const field = cell.dataset.stat.slice(name.length + 1);
          const value = service[field];
          cell.textContent = value === null || value === undefined ? "–" : field.startsWith("latency_") ? formatMicros(value) : value;
        }
        const rate = document.querySelector(`[data-rate="${CSS.escape(name)}"]`);
        if (rate && previous && previous.services[name]) {
          const per = (service.requests - previous.services[name].requests) / (now - previous.at);
          rate.textContent = per >= 0 ? per.toFixed(per < 10 ? 1 : 0) : "–";
        }
      }
      for (const cell of $$("[data-total]")) {
        const value = cell.dataset.total.split(".").reduce((v, k) => (v == null ? v : v[k]), status);
        if (value !== undefined && value !== null) cell.textContent = value;
      }
      previous = { at: now, services };
    } catch (e) { /* the next poll tries again */ }
  }
  function formatMicros(us) {
    if (us < 1000) return `${Math.round(us)} µs`;
    if (us < 1e6) return `${(us / 1000).toFixed(us < 1e4 ? 2 : 1)} ms`;
    return `${(us / 1e6).toFixed(2)} s`;
  }

  // The scenarios page: each one's live state again every two seconds.
  async function pollScenarios() {
    try {
      const response = await fetch("/api/scenarios", { headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const answer = await response.json();
      for (const scenario of answer.scenarios || []) {
        const card = document.querySelector(`article[data-scenario="${CSS.escape(scenario.name)}"]`);
        if (!card) continue;
        const status = scenario.status || {};
        const running = card.querySelector(".badge.running");
        if (running) running.hidden = !status.running;
        const lastRun = card.querySelector("[data-field=last_run]");
        if (lastRun && status.last_run) {
          lastRun.innerHTML = "";
          const time = document.createElement("time");
          time.dataset.time = Math.round(status.last_run);
          lastRun.appendChild(time);
        }
        const lastResult = card.querySelector("[data-field=last_result]");
        if (lastResult && status.last_result) {
          const word = status.last_result.split(":")[0];
          const badge = document.createElement("span");
          badge.className = "badge result";
          badge.dataset.result = word;
          badge.title = status.last_result;
          badge.textContent = word;
          lastResult.replaceChildren(badge);
        }
      }
      ago();
    } catch (e) { /* the next poll tries again */ }
  }

  // A plugin's log, again every three seconds, kept scrolled to its end.
  async function pollLog(pre) {
    try {
      const response = await fetch(pre.dataset.log, { headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const answer = await response.json();
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      const text = (answer.lines || []).join("\n") || "(nothing yet)";
      if (pre.textContent !== text) {
        pre.textContent = text;
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      }
    } catch (e) { /* the next poll tries again */ }
  }

  document.addEventListener("DOMContentLoaded", () => {
    follow();
    ago();
    setInterval(ago, 5000);
    if (document.body.dataset.page === "bus") {
      pollStatus();
      setInterval(pollStatus, 2000);
    }
    if (document.querySelector("article[data-scenario]")) setInterval(pollScenarios, 2000);
    for (const pre of $$("pre[data-log]")) {
      pre.scrollTop = pre.scrollHeight;
      setInterval(() => pollLog(pre), 3000);
    }
  });
})();
