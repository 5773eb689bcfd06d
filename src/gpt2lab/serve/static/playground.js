// gpt2lab playground: streams /v1/completions (server-sent events) and colours each token by its probability.
// Plain browser JavaScript: no build step, no dependencies. The page's state is on <body data-state="...">:
// "idle" | "generating" | "done" | "stopped" | "error" (the browser test waits on it).
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_LOGPROBS = 5;

let model = null; // the /v1/models card
let controller = null; // AbortController of the request in flight
let run = null; // { text, tokens: [{text, logprob, top, offset}], spans, finish, started }

// ---------------------------------------------------------------------------------------------------- helpers
function probability(logprob) {
  return Math.exp(logprob);
}

// Red (unlikely) through yellow to green (likely). The square root spreads out the low probabilities, where most
// tokens of a sampled text live.
function probabilityColour(p) {
  const hue = 120 * Math.sqrt(Math.min(1, Math.max(0, p)));
  return `hsl(${hue.toFixed(0)} 85% 80%)`;
}

// Whitespace made visible for the tooltip: a token is often " the" or "\n".
function visible(text) {
  return text.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}

function percent(p) {
  return p >= 0.995 ? "100%" : p >= 0.001 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toPrecision(1)}%`;
}

function setState(state) {
  document.body.dataset.state = state;
}

function setStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// "\n\n" typed into the stop box means two newlines.
function unescape(text) {
  return text.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
}

// ------------------------------------------------------------------------------------------------ model info
async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    model = body.data[0];
    const arch = model.architecture || {};
    $("model-info").textContent =
      `${model.id} · ${arch.n_layer} layers × ${arch.n_embd} wide · context ${model.context_length} tokens`;
    $("model-info").classList.remove("error");
    const maxTokens = $("max-tokens");
    maxTokens.max = model.limits.max_tokens;
    if (Number(maxTokens.value) > model.limits.max_tokens / 2) {
      maxTokens.value = String(Math.max(1, Math.floor(model.limits.max_tokens / 2))); // room for the prompt
    }
  } catch (error) {
    $("model-info").textContent = `cannot read /v1/models: ${error.message}`;
    $("model-info").classList.add("error");
  }
}

// ----------------------------------------------------------------------------------------------- the request
function requestBody() {
  const number = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value,
    max_tokens: number("max-tokens"),
    temperature: number("temperature"),
    top_k: number("top-k") || 0,
    top_p: number("top-p") || 1,
    logprobs: TOP_LOGPROBS,
    stream: true,
    stream_options: { include_usage: true },
  };
  if (model) body.model = model.id;
  if ($("seed").value.trim() !== "") body.seed = Math.trunc(number("seed"));
  if ($("stop").value !== "") body.stop = unescape($("stop").value);
  return body;
}

async function generate() {
  if (controller) return;
  const body = requestBody();
  run = { text: "", tokens: [], spans: [], finish: null, started: performance.now(), usage: null };
  $("prompt-echo").textContent = body.prompt;
  $("completion").replaceChildren();
  $("cursor").hidden = false;
  controller = new AbortController();
  setButtons(true);
  setState("generating");
  setStatus("Generating…");
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: authHeaders(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => null);
      throw new Error(error && error.error ? error.error.message : `HTTP ${response.status}`);
    }
    await readEvents(response.body);
    finish("done");
  } catch (error) {
    if (error.name === "AbortError") {
      finish("stopped");
    } else {
      setStatus(`Error: ${error.message}`, true);
      finish("error");
    }
  }
}

// Server-sent events: "data: {json}" blocks separated by a blank line, ending with "data: [DONE]".
async function readEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        handleChunk(JSON.parse(data));
      }
    }
  }
}

function handleChunk(chunk) {
  if (chunk.error) throw new Error(chunk.error.message);
  if (chunk.usage) run.usage = chunk.usage;
  for (const choice of chunk.choices || []) {
    appendText(choice.text, choice.logprobs);
    if (choice.finish_reason) run.finish = choice.finish_reason;
  }
  const seconds = (performance.now() - run.started) / 1000;
  setStatus(`Generating… ${run.tokens.length} tokens, ${(run.tokens.length / seconds).toFixed(1)} tokens/s`);
}

function finish(state) {
  controller = null;
  $("cursor").hidden = true;
  setButtons(false);
  if (state !== "error") {
    const seconds = (performance.now() - run.started) / 1000;
    const n = run.usage ? run.usage.completion_tokens : run.tokens.length;
    const why = { length: "reached max tokens", stop: "the model ended the text or hit the stop string" }[run.finish];
    setStatus(`${state === "stopped" ? "Stopped" : "Done"}: ${n} tokens in ${seconds.toFixed(2)} s ` +
      `(${(n / seconds).toFixed(1)} tokens/s)${why ? ` · ${why}` : ""}.`);
  }
  setState(state);
}

function setButtons(busy) {
  $("generate").disabled = busy;
  $("greedy").disabled = busy;
  $("stop-button").disabled = !busy;
}

// ------------------------------------------------------------------------------------------------- rendering
// Token k covers text[offset_k, offset_k+1): a character split over two tokens shows with the second one, and the
// last token's text can still grow when the next chunk arrives, so it is re-rendered then.
function appendText(text, logprobs) {
  run.text += text;
  if (logprobs) {
    logprobs.tokens.forEach((token, i) => {
      run.tokens.push({
        text: token, logprob: logprobs.token_logprobs[i], top: logprobs.top_logprobs[i], offset: logprobs.text_offset[i],
      });
    });
  }
  renderFrom(Math.max(0, run.spans.length - 1));
}

function renderFrom(first) {
  const completion = $("completion");
  for (let k = first; k < run.tokens.length; k++) {
    const token = run.tokens[k];
    const end = k + 1 < run.tokens.length ? run.tokens[k + 1].offset : run.text.length;
    let span = run.spans[k];
    if (!span) {
      span = document.createElement("span");
      span.className = "tok";
      span.dataset.index = String(k);
      span.style.background = probabilityColour(probability(token.logprob));
      completion.append(span);
      run.spans.push(span);
    }
    span.textContent = run.text.slice(token.offset, end);
  }
}

// -------------------------------------------------------------------------------------------------- tooltip
function showTooltip(span) {
  const token = run.tokens[Number(span.dataset.index)];
  const tooltip = $("tooltip");
  const p = probability(token.logprob);
  const rows = Object.entries(token.top).sort((a, b) => b[1] - a[1]);
  const header = document.createElement("div");
  header.className = "chosen";
  header.textContent = `${visible(token.text)}  ${percent(p)}  (logprob ${token.logprob.toFixed(3)})`;
  const table = document.createElement("table");
  for (const [text, logprob] of rows) {
    const q = probability(logprob);
    const tr = table.insertRow();
    if (text === token.text) tr.className = "is-chosen";
    tr.insertCell().textContent = visible(text);
    tr.insertCell().className = "p";
    tr.cells[1].textContent = percent(q);
    const bar = tr.insertCell();
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${Math.max(1, 100 * q)}%`;
    bar.append(fill);
  }
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = "the model's probabilities, before temperature, top-k and top-p";
  tooltip.replaceChildren(header, table, note);
  tooltip.hidden = false;
  const rect = span.getBoundingClientRect();
  const width = tooltip.offsetWidth;
  const height = tooltip.offsetHeight;
  const left = Math.min(Math.max(4, rect.left), window.innerWidth - width - 4);
  const below = rect.bottom + 6 + height < window.innerHeight;
  tooltip.style.left = `${left}px`;
  tooltip.style.top = `${below ? rect.bottom + 6 : Math.max(4, rect.top - height - 6)}px`;
}

// ------------------------------------------------------------------------------------------------- wiring
function init() {
  for (const swatch of document.querySelectorAll("#legend .swatch")) {
    swatch.style.background = probabilityColour(Number(swatch.dataset.p));
  }
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  $("greedy").addEventListener("click", () => {
    $("temperature").value = "0";
    generate();
  });
  $("stop-button").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  $("api-key").addEventListener("change", loadModel);
  const completion = $("completion");
  completion.addEventListener("mouseover", (event) => {
    if (event.target.classList.contains("tok")) showTooltip(event.target);
  });
  completion.addEventListener("mouseout", (event) => {
    if (event.target.classList.contains("tok")) $("tooltip").hidden = true;
  });
  setState("idle");
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
