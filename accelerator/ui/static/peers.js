// Peers tab: the configured peers (GET /peers?expand) and their probed state with the reason of a
// "disabled" (GET /transfers/remote, every peer probed concurrently by the daemon).

import { get } from "./api.js";
import { el, setText } from "./format.js";

const $ = (id) => document.getElementById(id);
let configs = null;
let probing = null;

export function peerConfigs(reload = false) {
  if (!configs || reload) {
    configs = get("/peers?expand").then((answer) => answer || {});
    configs.catch(() => { configs = null; });
  }
  return configs;
}

export function initPeers() {
  $("refresh-peers").addEventListener("click", () => loadPeers(true));
}

function row(name, config) {
  const mode = config.RemoteSelf ? `pull mode (known there as "${config.RemoteSelf}")` : "push";
  return el("tr", { "data-peer": name },
    el("th", { scope: "row", class: "name", text: name }),
    el("td", { class: "url", text: config.Url || "" }),
    el("td", { class: "state", "data-state": "probing", text: "probing…" }),
    el("td", { class: "reason", text: "" }),
    el("td", { class: "mode", text: mode }),
    el("td", { class: "rtt num", text: "…" }));
}

export function loadPeers(reload = false) {
  if (probing && !reload) return probing;
  probing = (async () => {
    const status = $("peers-status");
    const tbody = $("peer-list").tBodies[0];
    const button = $("refresh-peers");
    button.disabled = true;
    try {
      const peers = await peerConfigs(reload);
      const names = Object.keys(peers).sort();
      tbody.replaceChildren(...names.map((name) => row(name, peers[name])));
      if (!names.length) {
        status.textContent = "No peer configured (OrthancPeers in the configuration).";
        return;
      }
      status.textContent = `Probing ${names.length} ${names.length === 1 ? "peer" : "peers"}…`;
      const started = performance.now();
      const states = await get("/transfers/remote");
      const elapsed = Math.round(performance.now() - started);
      for (const name of names) {
        const tr = tbody.querySelector(`tr[data-peer="${CSS.escape(name)}"]`);
        const probe = states[name] || { State: "disabled", Reason: "not probed" };
        const state = tr.querySelector("td.state");
        setText(state, probe.State);
        state.dataset.state = probe.State;
        setText(tr.querySelector("td.reason"), probe.State === "disabled" ? (probe.Reason || "unknown reason") : (probe.Reason || ""));
        const rtt = probe.RoundTripMs ?? probe.RoundTrip;
        const cell = tr.querySelector("td.rtt");
        if (typeof rtt === "number") {
          setText(cell, `${Math.round(rtt)} ms`);
          cell.title = "round trip of this peer's probe";
        } else {
          setText(cell, `≤ ${elapsed} ms`);
          cell.title = "time of the whole probe (all peers are probed at once)";
        }
      }
      status.textContent = `Probed at ${new Date().toLocaleTimeString()} in ${elapsed} ms.`;
    } catch (error) {
      status.textContent = `Cannot probe the peers: ${error.message}`;
    } finally {
      button.disabled = false;
      probing = null;
    }
  })();
  return probing;
}
