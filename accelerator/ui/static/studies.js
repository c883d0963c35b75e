// Studies tab: search through POST /tools/find, counts and sizes from /studies/{id}/statistics,
// selection, and the send form (POST /transfers/send; pull mode when the peer has RemoteSelf).

import { get, post } from "./api.js";
import { bytes, dicomDate, el, personName } from "./format.js";
import { peerConfigs } from "./peers.js";

const LIMIT = 500;
const FIELDS = [
  ["q-patient-name", "PatientName"],
  ["q-patient-id", "PatientID"],
  ["q-study-date", "StudyDate"],
  ["q-description", "StudyDescription"],
  ["q-accession", "AccessionNumber"],
];

const $ = (id) => document.getElementById(id);
let searchRun = 0;

export function initStudies({ onSent }) {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });
  $("send-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send(onSent);
  });
  $("select-all").addEventListener("change", (event) => {
    for (const box of document.querySelectorAll("#study-results input.select-study")) box.checked = event.target.checked;
    updateSendButton();
  });
  $("study-results").addEventListener("change", (event) => {
    if (event.target.matches("input.select-study")) updateSendButton();
  });
  $("send-peer").addEventListener("change", () => describeMode());
  loadPeerChoices();
  updateSendButton();
}

export async function loadPeerChoices() {
  const select = $("send-peer");
  try {
    const peers = await peerConfigs();
    const previous = select.value;
    select.replaceChildren(...Object.keys(peers).map((name) =>
      el("option", { value: name, text: peers[name].RemoteSelf ? `${name} (pull mode)` : name })));
    if (previous && peers[previous]) select.value = previous;
    if (!Object.keys(peers).length) {
      select.append(el("option", { value: "", text: "no peer configured", disabled: true, selected: true }));
    }
  } catch (error) {
    $("send-status").textContent = `Cannot list the peers: ${error.message}`;
  }
  describeMode();
  updateSendButton();
}

async function describeMode() {
  const name = $("send-peer").value;
  const peers = await peerConfigs().catch(() => ({}));
  const peer = peers[name];
  $("send-mode").textContent = !peer ? ""
    : peer.RemoteSelf ? `Pull mode: ${name} will download from this server (it knows us as "${peer.RemoteSelf}").`
      : `Push mode: this server uploads to ${name}.`;
}

function selectedIds() {
  return [...document.querySelectorAll("#study-results input.select-study:checked")]
    .map((box) => box.closest("tr").dataset.studyId);
}

function updateSendButton() {
  const count = selectedIds().length;
  $("send").disabled = count === 0 || !$("send-peer").value;
  $("send").textContent = count ? `Send ${count} ${count === 1 ? "study" : "studies"}` : "Send selected";
}

export async function search() {
  const run = ++searchRun;
  const query = {};
  for (const [id, tag] of FIELDS) {
    const value = $(id).value.trim();
    if (value) query[tag] = value;
  }
  const status = $("search-status");
  const tbody = $("study-results").tBodies[0];
  status.textContent = "Searching…";
  $("search").disabled = true;
  try {
    const studies = await post("/tools/find", { Level: "Study", Query: query, Expand: true, Limit: LIMIT });
    if (run !== searchRun) return;
    tbody.replaceChildren(...studies.map(studyRow));
    $("select-all").checked = false;
    status.textContent = studies.length === 0 ? "No study matches."
      : `${studies.length} ${studies.length === 1 ? "study" : "studies"}${studies.length >= LIMIT ? ` (first ${LIMIT} shown: narrow the search)` : ""}.`;
    updateSendButton();
    await fillStatistics(studies.map((s) => s.ID), run);
  } catch (error) {
    if (run === searchRun) status.textContent = `Search failed: ${error.message}`;
  } finally {
    if (run === searchRun) $("search").disabled = false;
  }
}

function studyRow(study) {
  const tags = study.MainDicomTags || {};
  const patient = study.PatientMainDicomTags || {};
  const name = personName(patient.PatientName) || "(no name)";
  const box = el("input", { type: "checkbox", class: "select-study", value: study.ID,
    "aria-label": `Select study of ${name}, ${dicomDate(tags.StudyDate) || "no date"}` });
  return el("tr", { "data-study-id": study.ID },
    el("td", { class: "check" }, box),
    el("td", { class: "patient-name", text: name }),
    el("td", { class: "patient-id", text: patient.PatientID || "" }),
    el("td", { class: "study-date", text: dicomDate(tags.StudyDate) }),
    el("td", { class: "description", text: tags.StudyDescription || "" }),
    el("td", { class: "accession", text: tags.AccessionNumber || "" }),
    el("td", { class: "instances num", text: "…" }),
    el("td", { class: "size num", text: "…" }));
}

async function fillStatistics(ids, run) {
  const queue = [...ids];
  const worker = async () => {
    while (queue.length && run === searchRun) {
      const id = queue.shift();
      const row = document.querySelector(`#study-results tr[data-study-id="${CSS.escape(id)}"]`);
      try {
        const stats = await get(`/studies/${encodeURIComponent(id)}/statistics`);
        if (row) {
          row.querySelector("td.instances").textContent = String(stats.CountInstances ?? "—");
          row.querySelector("td.size").textContent = bytes(Number(stats.UncompressedSize));
        }
      } catch {
        if (row) row.querySelector("td.instances").textContent = "—";
      }
    }
  };
  await Promise.all(Array.from({ length: 6 }, worker));
}

async function send(onSent) {
  const ids = selectedIds();
  const peer = $("send-peer").value;
  const status = $("send-status");
  if (!ids.length || !peer) {
    status.textContent = !peer ? "Choose a peer first." : "Select at least one study first.";
    return;
  }
  $("send").disabled = true;
  status.textContent = `Sending ${ids.length} ${ids.length === 1 ? "study" : "studies"} to ${peer}…`;
  try {
    const answer = await post("/transfers/send", {
      Peer: peer,
      Resources: ids.map((id) => ({ Level: "Study", ID: id })),
      Compression: $("send-compression").value,
    });
    if (answer && answer.RemoteJob) {
      status.textContent = `${peer} pulls the studies from this server: remote job ${answer.RemoteJob}`;
      status.dataset.remoteJob = answer.RemoteJob;
      delete status.dataset.jobId;
    } else {
      status.textContent = `Job ${answer.ID} created (push to ${peer}).`;
      status.dataset.jobId = answer.ID;
      delete status.dataset.remoteJob;
    }
    onSent(answer, peer);
  } catch (error) {
    status.textContent = `Sending failed: ${error.message}`;
  } finally {
    updateSendButton();
  }
}
