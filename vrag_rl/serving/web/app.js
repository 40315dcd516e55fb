// The agent's web page: ask, watch each turn stream in, read the answer with the pages it rests on.
"use strict";
const $ = (id) => document.getElementById(id);
const PAGE = 50;
let maxImageBytes = 10 << 20;
let corpusOffset = 0;
let sessionBoxes = {}; // page id -> crop boxes seen in this answer, drawn in the full-page viewer
// A server started with an API key needs it on every request but the page itself: asked for once, kept for the tab.
let apiKey = sessionStorage.getItem("vrag-api-key");

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// A page id as people read it: a video frame's with its time in the video.
function label(view) {
  return view.timestamp === undefined || view.timestamp === null ? view.page : `${view.page} (at ${view.timestamp.toFixed(1)} s)`;
}

// fetch() with the API key, when there is one; a 401 asks for it.
async function api(url, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const response = await fetch(url, Object.assign({}, options, { headers }));
  if (response.status === 401) askKey();
  return response;
}

function askKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

// An image of this server: by its URL, or fetched with the key (an <img> cannot send one) and shown from a blob.
function setSrc(img, url) {
  if (!apiKey) {
    img.src = url;
    return;
  }
  api(url).then(async (response) => {
    if (!response.ok) return;
    img.src = URL.createObjectURL(await response.blob());
    img.onload = () => URL.revokeObjectURL(img.src);
  });
}

function pageUrl(page, box, side) {
  let url = `/pages/${encodeURIComponent(page)}?side=${side}`;
  if (box) url += `&box=${box.join(",")}`;
  return url;
}

// A page thumbnail with boxes drawn where they were cut from; click: the full page.
function pageFigure(view, boxes, caption) {
  const fig = el("figure");
  const wrap = el("div", "page");
  const img = el("img");
  setSrc(img, pageUrl(view.page, null, 520));
  img.alt = `page ${view.page}`;
  wrap.appendChild(img);
  for (const box of boxes) wrap.appendChild(boxDiv(box, view.width, view.height));
  wrap.onclick = () => openViewer(view);
  fig.appendChild(wrap);
  fig.appendChild(el("figcaption", "", caption || label(view)));
  return fig;
}

function boxDiv(box, width, height) {
  const d = el("div", "box");
  if (!width || !height) return d;
  d.style.left = `${(100 * box[0]) / width}%`;
  d.style.top = `${(100 * box[1]) / height}%`;
  d.style.width = `${(100 * (box[2] - box[0])) / width}%`;
  d.style.height = `${(100 * (box[3] - box[1])) / height}%`;
  return d;
}

function viewFigures(view) {
  const out = [];
  if (view.box) {
    (sessionBoxes[view.page] = sessionBoxes[view.page] || []).push(view.box);
    out.push(pageFigure(view, [view.box], `${label(view)}: crop [${view.box.join(", ")}]`));
    const zoom = el("figure", "crop");
    const img = el("img");
    setSrc(img, pageUrl(view.page, view.box, 520));
    img.alt = `crop of ${view.page}`;
    zoom.appendChild(img);
    zoom.appendChild(el("figcaption", "", "zoomed crop"));
    out.push(zoom);
  } else {
    out.push(pageFigure(view, [], label(view)));
  }
  return out;
}

function openViewer(view) {
  const frame = $("viewer").querySelector(".page");
  frame.querySelectorAll(".box").forEach((b) => b.remove());
  setSrc($("viewer-img"), pageUrl(view.page, null, 1600));
  for (const box of sessionBoxes[view.page] || []) frame.appendChild(boxDiv(box, view.width, view.height));
  $("viewer-caption").textContent = `page ${label(view)}, ${view.width} x ${view.height}`;
  $("viewer").hidden = false;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function renderTurn(event) {
  const card = el("div", "turn");
  if (event.type === "image_search") {
    card.appendChild(el("h3", "", "Search by image"));
    card.appendChild(el("p", "", "The pages most like your image, shown with the question:"));
  } else {
    card.appendChild(el("h3", "", `Turn ${event.turn}`));
    if (event.think) card.appendChild(el("p", "think", event.think));
    const what = {
      search: () => `search: ${event.query}`,
      bbox: () => `crop: [${event.box.map((v) => Math.round(v)).join(", ")}]`,
      answer: () => `answer: ${event.answer}`,
      invalid: () => `invalid action: ${event.reason}`,
    }[event.action];
    card.appendChild(el("span", `action ${event.action}`, what()));
  }
  const views = el("div", "views");
  for (const view of event.views) viewFigures(view).forEach((f) => views.appendChild(f));
  if (event.views.length) card.appendChild(views);
  $("turns").appendChild(card);
}

function renderResult(result) {
  const box = $("answer");
  box.replaceChildren();
  box.className = "answer";
  if (result.answer === null) {
    box.appendChild(el("p", "text", "No answer"));
    box.appendChild(el("p", "", `The agent stopped without answering (${result.stop_reason}).`));
  } else {
    box.appendChild(el("p", "text", result.answer));
  }
  if (result.citations.length) {
    box.appendChild(el("p", "", "Pages it rests on (the one read last is outlined):"));
    const cites = el("div", "cites");
    for (const c of result.citations) {
      const fig = pageFigure(c, c.box ? [c.box] : [], c.box ? `${label(c)}: crop` : label(c));
      fig.className = c.last ? "cite last" : "cite";
      cites.appendChild(fig);
    }
    box.appendChild(cites);
  }
  const s = `${result.searches} searches, ${result.crops} crops, ${result.invalid_actions} invalid actions, ${result.seconds} s`;
  box.appendChild(el("p", "", s));
  box.hidden = false;
}

async function refusal(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || body.detail || message;
  } catch (e) {}
  if (response.status === 413) return `The request is too large: ${message}`;
  if (response.status === 503) return `The server cannot answer now: ${message}`;
  return `The request failed: ${message}`;
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function ask(event) {
  event.preventDefault();
  showError("");
  $("turns").replaceChildren();
  $("answer").hidden = true;
  sessionBoxes = {};
  const content = [{ type: "text", text: $("question").value }];
  const file = $("image").files[0];
  if (file) {
    if (file.size > maxImageBytes) {
      showError(`The image is ${(file.size / 1e6).toFixed(1)} MB; the limit is ${(maxImageBytes / 1e6).toFixed(1)} MB.`);
      return;
    }
    content.push({ type: "image_url", image_url: { url: await readImage(file) } });
  }
  $("send").disabled = true;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: "agent", stream: true, messages: [{ role: "user", content }] }),
    });
    if (!response.ok) {
      showError(await refusal(response));
      return;
    }
    await readStream(response);
  } catch (e) {
    showError(`Cannot reach the server: ${e.message}`);
  } finally {
    $("send").disabled = false;
  }
}

async function readStream(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const data = JSON.parse(line.slice(6));
      if (data.error) showError(`The agent stopped: ${data.error.message}`);
      else if (data.vrag && data.vrag.type === "result") renderResult(data.vrag);
      else if (data.vrag) renderTurn(data.vrag);
    }
  }
}

async function checkReady() {
  let message = null;
  try {
    const response = await api("/ready");
    const body = await response.json();
    if (response.status === 401) {
      message = "this server needs its API key.";
    } else if (response.ok) {
      $("model").textContent = `${body.model} over ${body.pages} pages`;
      if (body.max_image_bytes) maxImageBytes = body.max_image_bytes;
    } else {
      message = (body.error && body.error.message) || "not ready";
    }
  } catch (e) {
    message = "Cannot reach the server.";
  }
  $("status").textContent = message ? `Not ready: ${message}` : "";
  $("status").hidden = !message;
  if (message && !$("key-form").hidden) return; // asked again once a key is given
  if (message) setTimeout(checkReady, 5000);
}

async function loadCorpus() {
  const response = await api(`/v1/corpus?offset=${corpusOffset}&limit=${PAGE}`);
  if (!response.ok) return;
  const body = await response.json();
  const grid = $("grid");
  grid.replaceChildren();
  for (const p of body.pages) {
    const fig = el("figure");
    const wrap = el("div", "page");
    const img = el("img");
    setSrc(img, pageUrl(p.page, null, 300));
    img.alt = `page ${p.page}`;
    img.loading = "lazy";
    wrap.appendChild(img);
    wrap.onclick = () => openViewer(p);
    fig.appendChild(wrap);
    fig.appendChild(el("figcaption", "", label(p)));
    grid.appendChild(fig);
  }
  const end = Math.min(body.total, corpusOffset + body.pages.length);
  $("range").textContent = body.total ? `pages ${corpusOffset + 1}-${end} of ${body.total}` : "The corpus has no pages.";
  $("prev").disabled = corpusOffset === 0;
  $("next").disabled = end >= body.total;
}

function showTab(name) {
  $("ask").hidden = name !== "ask";
  $("corpus").hidden = name !== "corpus";
  $("tab-ask").classList.toggle("on", name === "ask");
  $("tab-corpus").classList.toggle("on", name === "corpus");
  if (name === "corpus") loadCorpus();
}

$("form").addEventListener("submit", ask);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("key").value;
  sessionStorage.setItem("vrag-api-key", apiKey);
  $("key-form").hidden = true;
  checkReady();
  if (!$("corpus").hidden) loadCorpus();
});
$("image").addEventListener("change", () => ($("image-name").textContent = $("image").files[0] ? $("image").files[0].name : ""));
$("tab-ask").onclick = () => showTab("ask");
$("tab-corpus").onclick = () => showTab("corpus");
$("prev").onclick = () => { corpusOffset = Math.max(0, corpusOffset - PAGE); loadCorpus(); };
$("next").onclick = () => { corpusOffset += PAGE; loadCorpus(); };
$("viewer").onclick = () => ($("viewer").hidden = true);
checkReady();
