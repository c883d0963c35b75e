// The page: three tabs (Studies, Peers, Jobs), each a <section> shown alone (`hidden` on the others).

import { initJobs, followRemote, refreshSoon } from "./jobs.js";
import { initPeers, loadPeers } from "./peers.js";
import { initStudies, search } from "./studies.js";

const TABS = ["studies", "peers", "jobs"];

export function showTab(name, { focus = false } = {}) {
  if (!TABS.includes(name)) name = "studies";
  for (const tab of TABS) {
    const active = tab === name;
    document.getElementById(tab).hidden = !active;
    const button = document.getElementById(`tab-${tab}`);
    button.setAttribute("aria-selected", String(active));
    button.classList.toggle("active", active);
    if (active) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (focus) document.getElementById(`tab-${name}`).focus();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "peers") loadPeers();
  if (name === "jobs") refreshSoon();
}

function initTabs() {
  const nav = document.querySelector("header nav");
  nav.addEventListener("click", (event) => {
    const button = event.target.closest("button[id^='tab-']");
    if (button) showTab(button.id.slice(4));
  });
  nav.addEventListener("keydown", (event) => {
    const current = TABS.indexOf(document.activeElement?.id?.slice(4));
    if (current < 0) return;
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (step) {
      event.preventDefault();
      showTab(TABS[(current + step + TABS.length) % TABS.length], { focus: true });
    }
  });
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
}

function start() {
  initTabs();
  initPeers();
  initStudies({
    onSent(answer, peer) {
      if (answer && answer.RemoteJob) followRemote(peer, answer.RemoteJob);
      showTab("jobs");
    },
  });
  initJobs();
  showTab(location.hash.slice(1) || "studies");
  search();
}

start();
