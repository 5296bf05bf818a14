// NeuroShard web chat. Everything the model writes is untrusted (a hostile node can steer
// the text), so replies are never parsed as HTML: the markdown below builds DOM nodes and
// sets only textContent, and the server's Content-Security-Policy forbids inline scripts,
// event-handler attributes and images anyway.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // {role, content} of the current chat
let controller = null;       // AbortController of the answer being streamed

function apiKey() { return sessionStorage.getItem("neuroshard-api-key") || ""; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// ---- markdown, as DOM (no innerHTML anywhere) ----

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// Inline `code`, **bold** and *italic*; everything else is text.
function inline(parent, text) {
  const re = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    const t = m[0];
    if (t.startsWith("`")) parent.appendChild(el("code", null, t.slice(1, -1)));
    else if (t.startsWith("**")) parent.appendChild(el("strong", null, t.slice(2, -2)));
    else parent.appendChild(el("em", null, t.slice(1, -1)));
    last = m.index + t.length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function renderMarkdown(target, text) {
  target.replaceChildren();
  const lines = text.split("\n");
  let para = [], list = null, i = 0;
  const flushPara = () => {
    if (para.length) { const p = el("p"); inline(p, para.join("\n")); target.appendChild(p); }
    para = [];
  };
  const flushList = () => { if (list) target.appendChild(list); list = null; };
  while (i < lines.length) {
    const line = lines[i];
    if (line.startsWith("```")) {
      flushPara(); flushList();
      const code = [];
      i++;
      while (i < lines.length && !lines[i].startsWith("```")) code.push(lines[i++]);
      i++; // the closing fence (or the end of a reply still streaming)
      const pre = el("pre"); pre.appendChild(el("code", null, code.join("\n")));
      target.appendChild(pre);
      continue;
    }
    const heading = /^(#{1,3})\s+(.*)$/.exec(line);
    const bullet = /^\s*[-*]\s+(.*)$/.exec(line);
    const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
    if (heading) {
      flushPara(); flushList();
      const h = el("h" + (heading[1].length + 3)); inline(h, heading[2]); target.appendChild(h);
    } else if (bullet || numbered) {
      flushPara();
      const tag = bullet ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) { flushList(); list = el(tag); }
      const li = el("li"); inline(li, (bullet || numbered)[1]); list.appendChild(li);
    } else if (line.trim() === "") {
      flushPara(); flushList();
    } else {
      flushList(); para.push(line);
    }
    i++;
  }
  flushPara(); flushList();
}

// ---- chat ----

function addMessage(role, text) {
  const div = el("div", "msg " + role);
  if (role === "assistant") renderMarkdown(div, text); else div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function settings() {
  const body = {
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  return body;
}

// Reads an SSE body, calling onData with each `data:` payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (_) { return response.statusText; }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  let reply = "";
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ messages, ...settings() }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        reply += delta.content;
        renderMarkdown(bubble, reply);
        bubble.scrollIntoView({ block: "end" });
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") {
      bubble.classList.add("error");
      bubble.appendChild(el("p", null, "error: " + e.message));
    }
  } finally {
    history.push({ role: "assistant", content: reply });
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

// ---- swarm panel ----

function short(id) { return id.slice(0, 10); }

function renderSwarm(view) {
  const status = $("swarm-status");
  if (view.error) { status.textContent = "swarm unreachable: " + view.error; return; }
  const up = view.nodes.filter((n) => n.up).length;
  status.textContent = `${view.nodes.length} nodes (${up} up), ${view.layers} layers` +
    (view.gaps.length ? `, layers without a node: ${view.gaps.join(", ")}` : ", every layer covered");
  $("model").textContent = view.model_name || view.model;
  const coverage = $("coverage");
  coverage.replaceChildren();
  for (const n of view.nodes) {
    const row = el("div", "node" + (n.up ? "" : " down"));
    row.dataset.node = n.id;
    const label = el("div", "label");
    label.appendChild(el("span", null, `${short(n.id)}  layers ${n.layers[0]}-${n.layers[1]}`));
    const hop = n.ms_per_step == null ? "" : ` · ${n.ms_per_step.toFixed(1)} ms/step`;
    const t = n.trust || { state: "probation", score: 0, reason: "" };
    const trust = ` · ${t.state} (score ${Math.round(t.score)})`;
    const info = el("span", "trust-" + t.state, n.up ? `load ${n.load}/${n.capacity}${hop}${trust}` : "down" + trust);
    if (t.reason) info.title = t.reason;
    label.appendChild(info);
    const bar = el("div", "bar");
    const span = el("div", "span");
    span.style.left = (100 * n.layers[0] / view.layers) + "%";
    span.style.width = (100 * (n.layers[1] - n.layers[0]) / view.layers) + "%";
    bar.appendChild(span);
    row.appendChild(label); row.appendChild(bar);
    coverage.appendChild(row);
  }
  const route = $("route");
  route.replaceChildren();
  for (const hop of (view.route ? view.route.hops : [])) {
    const ms = hop.ms_per_step == null ? "" : ` (${hop.ms_per_step.toFixed(1)} ms/step)`;
    route.appendChild(el("li", null, `${short(hop.node)}: layers ${hop.layers[0]}-${hop.layers[1]}${ms}`));
  }
  const r = view.route;
  const votes = $("votes");
  votes.replaceChildren();
  const replicated = r && r.replicas && r.replicas.length > 0;
  if (replicated) {
    r.replicas.forEach((range, i) => {
      votes.appendChild(el("li", null, `range ${i} replicas: ${range.map(short).join(", ")}`));
    });
    if (r.votes.length === 0) {
      votes.appendChild(el("li", "vote-ok", "every vote agreed"));
    }
    for (const finding of r.votes) votes.appendChild(el("li", "vote-finding", finding));
  } else {
    votes.appendChild(el("li", "muted", "one node per range (no votes)"));
  }
  $("speed").textContent = !r ? "no generation yet" :
    r.active ? "generating..." : `last answer: ${r.tokens_per_sec.toFixed(1)} tokens/s`;
}

async function watchSwarm() {
  for (;;) {
    try {
      const response = await fetch("/v1/swarm/events", { headers: headers() });
      if (response.status === 401) {
        $("swarm-status").textContent = "this server wants an API key (Settings)";
        $("settings").hidden = false;
      } else if (response.ok) {
        await readEvents(response, (data) => renderSwarm(JSON.parse(data)));
      }
    } catch (_) { /* reconnect below */ }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// ---- wiring ----

window.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", () =>
    sessionStorage.setItem("neuroshard-api-key", $("api-key").value));
  $("settings-toggle").addEventListener("click", () => {
    const s = $("settings"); s.hidden = !s.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!s.hidden));
  });
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    $("messages").replaceChildren();
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  watchSwarm();
});
