// Jobs tab: GET /jobs?expand polled every second, one card per job updated in place (no layout
// jump, focus kept), a throughput plot per job from the samples collected here, the actions
// POST /jobs/{id}/pause|resume|cancel|resubmit, and the peer's job of a pull-mode send followed
// through GET /transfers/remote/{peer}/jobs/{id}.

import { get, post } from "./api.js";
import { duration, el, mbps, setText } from "./format.js";
import { drawThroughput } from "./plot.js";

const POLL_MS = 1000;
const REMOTE_POLL_MS = 2000;
const WINDOW_S = 5; // throughput window of the plot's samples
const MAX_SAMPLES = 600;
const ACTIONS = {
  pause: ["Pending", "Running"],
  resume: ["Paused"],
  cancel: ["Pending", "Running", "Paused"],
  resubmit: ["Failure"],
};
const LABELS = { pause: "Pause", resume: "Resume", cancel: "Cancel", resubmit: "Resubmit" };
const TYPES = { PushTransfer: "Push to", PullTransfer: "Pull from", OrthancPeerStore: "Store to" };

const $ = (id) => document.getElementById(id);
const tracks = new Map(); // job id -> {samples, transferred: [{t, mb}]}
const remote = new Map(); // remote job id -> {peer, timer}
let timer = null;
let inFlight = false;

export function initJobs() {
  $("job-list").addEventListener("click", onAction);
  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => redrawAll()).observe($("jobs"));
  }
  poll();
}

export function refreshSoon() {
  clearTimeout(timer);
  timer = setTimeout(poll, 0);
}

// -- polling ---------------------------------------------------------------------------------

async function poll() {
  clearTimeout(timer);
  if (inFlight) return;
  inFlight = true;
  try {
    const jobs = await get("/jobs?expand");
    render(Array.isArray(jobs) ? jobs : []);
    setText($("jobs-status"), "");
  } catch (error) {
    setText($("jobs-status"), `Cannot read the jobs: ${error.message} (retrying every second)`);
  } finally {
    inFlight = false;
    timer = setTimeout(poll, POLL_MS);
  }
}

function render(jobs) {
  const list = $("job-list");
  const seen = new Set();
  jobs.sort((a, b) => String(b.CreationTime).localeCompare(String(a.CreationTime)));
  let previous = null;
  for (const job of jobs) {
    seen.add(job.ID);
    let card = list.querySelector(`:scope > [data-job-id="${CSS.escape(job.ID)}"]`);
    if (!card) {
      card = buildCard(job.ID, "data-job-id", true);
      if (previous) previous.after(card);
      else list.prepend(card);
    }
    update(card, job, track(job));
    previous = card;
  }
  for (const card of [...list.children]) {
    if (!seen.has(card.dataset.jobId)) {
      card.remove();
      tracks.delete(card.dataset.jobId);
    }
  }
  $("jobs-empty").hidden = jobs.length > 0 || remote.size > 0;
}

// -- throughput samples ----------------------------------------------------------------------

function transferredMB(content) {
  const value = content.UploadedSizeMB ?? content.DownloadedSizeMB;
  return typeof value === "number" ? value : null;
}

function track(job, key = job.ID) {
  let t = tracks.get(key);
  if (!t) {
    t = { samples: [], transferred: [], state: null };
    tracks.set(key, t);
  }
  const content = job.Content || {};
  const now = performance.now() / 1000;
  if (job.State === "Running") {
    const mb = transferredMB(content);
    let value = null;
    if (mb !== null) {
      t.transferred.push({ t: now, mb });
      while (t.transferred.length > 2 && now - t.transferred[1].t >= WINDOW_S) t.transferred.shift();
      const first = t.transferred[0];
      // The counter counts whole MB: below 1 MB moved in the window, the daemon's speed says more.
      if (now - first.t >= 1.5 && mb - first.mb >= 1) value = (mb - first.mb) / (now - first.t);
    }
    if (value === null && typeof content.NetworkSpeedKBs === "number") value = content.NetworkSpeedKBs / 1024;
    if (value !== null) {
      t.samples.push({ t: now, v: value });
      if (t.samples.length > MAX_SAMPLES) t.samples.shift();
    }
  } else {
    t.transferred = []; // a pause or an end breaks the window
  }
  t.state = job.State;
  return t;
}

// -- cards -----------------------------------------------------------------------------------

function stat(label, cls) {
  return el("div", { class: "stat" }, el("dt", { text: label }), el("dd", { class: cls, text: "—" }));
}

function buildCard(id, attribute, withActions) {
  const title = el("h3", { class: "job-title", text: "Job" });
  const percent = el("span", { class: "job-percent num", text: "0 %" });
  const progress = el("progress", { class: "job-progress", max: 100, value: 0, "data-progress": "0",
    "aria-label": "Progress" });
  const card = el("article", { class: "job", [attribute]: id, "aria-label": `Job ${id}` },
    el("header", { class: "job-head" },
      title,
      el("span", { class: "job-state", role: "status", text: "" })),
    el("p", { class: "job-id", text: attribute === "data-job-id" ? `ID ${id}` : `Job ${id} on the peer` }),
    el("div", { class: "job-bar" }, progress, percent),
    el("dl", { class: "job-stats" },
      stat("Speed", "job-speed"),
      stat("ETA", "job-eta"),
      stat("Instances", "job-instances"),
      stat("Buckets done", "job-buckets"),
      stat("Wire / total MB", "job-size"),
      stat("Retries", "job-retries")),
    el("canvas", { class: "job-plot", role: "img", "aria-label": "Throughput over time (MB/s)" }),
    el("p", { class: "job-error", role: "alert", hidden: true }));
  if (withActions) {
    card.append(el("div", { class: "job-actions" },
      ...Object.keys(ACTIONS).map((action) => el("button", { type: "button", class: action,
        "data-action": action, text: LABELS[action], disabled: true, "aria-label": `${LABELS[action]} job ${id}` }))));
  }
  return card;
}

function serverTime(value) {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(?:\.(\d{1,6}))?$/.exec(value || "");
  if (!m) return null;
  const ms = m[7] ? Number(m[7].padEnd(6, "0").slice(0, 3)) : 0;
  return Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6], ms);
}

function plainError(job) {
  const description = job.ErrorDescription || "Error";
  const details = (job.ErrorDetails || "").trim();
  if (job.ErrorCode === 14 || /canceled/i.test(description)) {
    return `Canceled: the job was stopped before the end${details ? ` (${details})` : ""}. Resubmit it to start again.`;
  }
  return `The transfer failed: ${description}.${details ? ` ${details}` : ""} Resubmitting runs it again from the buckets not yet done.`;
}

function update(card, job, t) {
  const content = job.Content || {};
  const state = job.State || "";
  card.dataset.state = state;
  const verb = TYPES[job.Type];
  setText(card.querySelector(".job-title"), verb && content.Peer ? `${verb} ${content.Peer}` : (job.Type || "Job"));
  setText(card.querySelector(".job-state"), state);

  const pct = Math.max(0, Math.min(100, Math.round(Number(job.Progress) || 0)));
  const progress = card.querySelector(".job-progress");
  if (progress.value !== pct) progress.value = pct;
  progress.dataset.progress = String(pct);
  progress.setAttribute("aria-valuetext", `${pct} percent`);
  setText(card.querySelector(".job-percent"), `${pct} %`);

  const speed = typeof content.NetworkSpeedKBs === "number" ? content.NetworkSpeedKBs / 1024 : null;
  const last = t.samples.length ? t.samples[t.samples.length - 1].v : null;
  setText(card.querySelector(".job-speed"), state === "Running" && last !== null ? mbps(last)
    : speed !== null ? mbps(speed) : "—");
  card.querySelector(".job-speed").title = state === "Running" ? "over the last seconds" : "average of the run";

  let eta = "—";
  if (state === "Success") eta = "done";
  else if (state === "Running") {
    const end = serverTime(job.EstimatedTimeOfArrival);
    const now = serverTime(job.Timestamp);
    if (end !== null && now !== null) eta = duration((end - now) / 1000);
  } else if (state === "Paused") eta = "paused";
  setText(card.querySelector(".job-eta"), eta);

  const total = content.TotalInstances;
  const done = content.CompletedInstances ?? (state === "Success" ? total : null);
  setText(card.querySelector(".job-instances"), total === undefined ? "—" : `${done ?? "…"} / ${total}`);
  const buckets = content.CompletedHttpQueries;
  const allBuckets = content.TotalBuckets ?? content.TotalHttpQueries;
  setText(card.querySelector(".job-buckets"), buckets === undefined ? "—"
    : allBuckets !== undefined ? `${buckets} / ${allBuckets}` : String(buckets));
  const moved = transferredMB(content);
  setText(card.querySelector(".job-size"), content.TotalSizeMB === undefined ? "—"
    : moved !== null ? `${moved} / ${content.TotalSizeMB}` : `${content.TotalSizeMB} MB`);
  const retries = content.Retries ?? content.HttpRetries ?? content.RetriedHttpQueries;
  setText(card.querySelector(".job-retries"), retries === undefined ? "—" : String(retries));

  const error = card.querySelector(".job-error");
  if (state === "Failure") {
    setText(error, plainError(job));
    error.hidden = false;
  } else if (!error.hidden) {
    error.hidden = true;
    error.textContent = "";
  }

  const busy = card.dataset.busy === "1";
  for (const [action, states] of Object.entries(ACTIONS)) {
    const button = card.querySelector(`button.${action}`);
    if (button) button.disabled = busy || !states.includes(state);
  }
  keepFocus(card);
  drawThroughput(card.querySelector("canvas.job-plot"), t.samples, emptyWords(state));
}

function emptyWords(state) {
  return ["Success", "Failure"].includes(state) ? "finished before this page watched it"
    : state === "Running" ? "collecting samples…" : `no throughput while ${state.toLowerCase()}`;
}

function keepFocus(card) {
  // A focused button that became disabled drops the focus; give it to the next useful action.
  if (card.dataset.hadFocus !== "1") return;
  const active = document.activeElement;
  if (active && active !== document.body && card.contains(active) && !active.disabled) return;
  const next = card.querySelector(".job-actions button:not(:disabled)");
  if (next) {
    next.focus();
    delete card.dataset.hadFocus;
  }
}

function redrawAll() {
  for (const card of document.querySelectorAll("#job-list > [data-job-id]")) {
    const t = tracks.get(card.dataset.jobId);
    if (t) drawThroughput(card.querySelector("canvas.job-plot"), t.samples, emptyWords(t.state || ""));
  }
  for (const card of document.querySelectorAll("#remote-job-list > [data-remote-job-id]")) {
    const t = tracks.get(`remote:${card.dataset.remoteJobId}`);
    if (t) drawThroughput(card.querySelector("canvas.job-plot"), t.samples, emptyWords(t.state || ""));
  }
}

async function onAction(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const card = button.closest("[data-job-id]");
  const id = card.dataset.jobId;
  const action = button.dataset.action;
  card.dataset.busy = "1";
  if (document.activeElement === button) card.dataset.hadFocus = "1";
  for (const b of card.querySelectorAll(".job-actions button")) b.disabled = true;
  try {
    await post(`/jobs/${encodeURIComponent(id)}/${action}`, {});
    setText($("jobs-status"), `${LABELS[action]}: job ${id}.`);
  } catch (error) {
    setText($("jobs-status"), `${LABELS[action]} of job ${id} refused: ${error.message}`);
  } finally {
    delete card.dataset.busy;
    refreshSoon();
  }
}

// -- the peer's job of a pull-mode send --------------------------------------------------------

export function followRemote(peer, id) {
  if (remote.has(id)) return;
  const card = buildCard(id, "data-remote-job-id", false);
  card.dataset.peer = peer;
  $("remote-job-list").prepend(card);
  $("jobs-empty").hidden = true;
  const entry = { peer, timer: null };
  remote.set(id, entry);
  const tick = async () => {
    try {
      const job = await get(`/transfers/remote/${encodeURIComponent(peer)}/jobs/${encodeURIComponent(id)}`);
      update(card, job, track(job, `remote:${id}`));
      setText(card.querySelector(".job-title"), `${peer} pulls from this server`);
      if (job.State === "Success" || job.State === "Failure") return;
    } catch (error) {
      const box = card.querySelector(".job-error");
      box.hidden = false;
      setText(box, `Cannot follow the job on ${peer}: ${error.message}`);
    }
    entry.timer = setTimeout(tick, REMOTE_POLL_MS);
  };
  tick();
}
