// The avatar viewer: the expression pad, orbit + zoom, the webcam toggle, and the fps / latency read-out.
// Protocol: engine/live/protocol.py. Frames come back as binary messages: uint32 big-endian header length,
// JSON header, JPEG. Every message replaces our pending one on the server, so we send on every input event.
"use strict";

const $ = (id) => document.getElementById(id);
const STEP_CHOICES = [1, 2, 3, 4, 6, 8, 10, 15, 20, 30, 40, 50];
const WEBCAM_WIDTH = 320;
const WEBCAM_FPS = 15;                 // images sent a second at most; the server tracks each it can
const WEBCAM_IN_FLIGHT = 3;            // images sent but not yet answered by a "tracked" reply
const TOKEN = new URLSearchParams(location.search).get("token");   // where the server requires one

const state = {
  info: null, ws: null, nextId: 1,
  sent: new Map(),           // request id -> {t: performance.now() of the input event, kind}
  pad: { u: 0, v: 0 }, corners: [], selected: 0,       // the first view: the neutral corner
  camera: { yaw: 0, pitch: 0, distance: 1, fov: 16 },
  clamp: true,               // keep the orbit inside the avatar's trained views (info.view_range)
  frameQueued: false, frameT: null,
  webcam: { on: false, stream: null, inFlight: 0, lastSent: 0, canvas: document.createElement("canvas"),
            tracked: 0, fps: 0, lastTrackedAt: 0 },
  display: null,             // the frame being loaded into the <img>: {id, url, t}
  fps: 0, lastFrameAt: 0, latency: 0,
};
// Read by tests and handy in the console: every frame shown, with its input-to-load latency.
window.avatarViewer = { state, frames: 0, latencies: [], errors: [], tracks: [] };

// -- socket ------------------------------------------------------------------------------------------------
function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    if (TOKEN !== null) ws.send(JSON.stringify({ type: "hello", token: TOKEN }));  // the server's first check
    setStatus("connected", "ok");
  };
  ws.onclose = (event) => {
    state.ws = null;
    if (event.code === 1008) return setStatus("refused: open the URL with the token the server printed", "bad");
    setStatus("disconnected: retrying…", "bad"); setTimeout(connect, 2000);
  };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") onText(JSON.parse(event.data)); else onFrame(event.data);
  };
  state.ws = ws;
}

function send(message, t) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN || !state.info) return null;
  const id = state.nextId++;
  state.sent.set(id, { t: t ?? performance.now(), kind: message.type });
  message.id = id;
  if (message.jpeg instanceof ArrayBuffer) {            // a webcam image: binary, header + JPEG
    const jpeg = message.jpeg; delete message.jpeg;
    state.ws.send(pack(message, jpeg));
  } else {
    state.ws.send(JSON.stringify(message));
  }
  return id;
}

function pack(header, payload) {
  const head = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(4 + head.length + payload.byteLength);
  new DataView(out.buffer).setUint32(0, head.length);
  out.set(head, 4);
  out.set(new Uint8Array(payload), 4 + head.length);
  return out.buffer;
}

function onText(message) {
  if (message.type === "info") return setup(message);
  if (message.type === "tracked") return onTracked(message);
  if (message.type === "error") {
    window.avatarViewer.errors.push(message.message);
    $("error").textContent = message.message;
    const sent = state.sent.get(message.id);
    state.sent.delete(message.id);
    if (sent && sent.kind === "video_frame") {
      state.webcam.inFlight = Math.max(0, state.webcam.inFlight - 1);
      if (/tracking unavailable|face trackers are in use/.test(message.message)) setWebcam(false);
    }
  }
}

function onTracked(message) {
  const cam = state.webcam;
  cam.inFlight = Math.max(0, cam.inFlight - 1);
  if (!cam.on) return;
  const now = performance.now();
  if (cam.lastTrackedAt) {
    const rate = 1000 / Math.max(1, now - cam.lastTrackedAt);
    cam.fps = cam.fps ? 0.8 * cam.fps + 0.2 * rate : rate;
  }
  cam.lastTrackedAt = now;
  cam.tracked += 1;
  window.avatarViewer.tracks.push({ time: message.time, face: message.face, head: message.head });
  if (window.avatarViewer.tracks.length > 1000) window.avatarViewer.tracks.shift();
  $("tracked").textContent = message.face ? "face" : "no face";
  $("tracking-fps").textContent = `${cam.fps.toFixed(1)} fps`;
}

function onFrame(buffer) {
  const n = new DataView(buffer).getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
  const sent = state.sent.get(header.id);
  for (const id of state.sent.keys()) if (id <= header.id) state.sent.delete(id);  // older ones were dropped
  if (sent && sent.kind === "video_frame") state.webcam.inFlight = Math.max(0, state.webcam.inFlight - 1);
  const url = URL.createObjectURL(new Blob([new Uint8Array(buffer, 4 + n)], { type: "image/jpeg" }));
  if (state.display) URL.revokeObjectURL(state.display.url);
  state.display = { id: header.id, url, t: sent ? sent.t : null, header };
  $("view").src = url;
}

function onImageLoad() {
  const shown = state.display;
  if (!shown || shown.done) return;
  shown.done = true;
  const now = performance.now();
  const viewer = window.avatarViewer;
  viewer.frames += 1;
  if (shown.t !== null) {
    const ms = now - shown.t;
    viewer.latencies.push({ id: shown.id, ms, cached: shown.header.cached });
    if (viewer.latencies.length > 1000) viewer.latencies.shift();
    state.latency = state.latency ? 0.8 * state.latency + 0.2 * ms : ms;
  }
  if (state.lastFrameAt) {
    const rate = 1000 / Math.max(1, now - state.lastFrameAt);
    state.fps = state.fps ? 0.8 * state.fps + 0.2 * rate : rate;
  }
  state.lastFrameAt = now;
  const h = shown.header;
  $("fps").textContent = `${state.fps.toFixed(1)} (server ${h.fps.toFixed(1)})`;
  $("latency").textContent = `${state.latency.toFixed(0)} ms (server ${h.latency_ms.toFixed(0)} ms)`;
  $("render-ms").textContent = h.cached ? "cached" : `${h.render_ms.toFixed(0)} ms`;
  $("dropped").textContent = String(h.dropped);
  if (!h.cached) $("error").textContent = "";
}

// -- setup -------------------------------------------------------------------------------------------------
function setup(info) {
  const first = state.info === null;
  state.info = info;
  $("avatar-name").textContent = `${info.avatar} · ${info.image_size}px · ${info.sampler}`;
  if (first) {
    state.corners = info.corners.map((c) => c.slice());
    Object.assign(state.camera, info.camera);
    document.querySelectorAll(".corner").forEach((b) => { b.textContent = info.corner_labels[+b.dataset.corner]; });
    $("clamp-label").hidden = !info.view_range;
    fillSelect($("steps"), STEP_CHOICES.filter((s) => s <= info.max_steps).concat([info.steps])
      .filter((s, i, a) => a.indexOf(s) === i).sort((a, b) => a - b), info.steps);
    fillSelect($("backend"), info.backends, info.backend);
    $("backend-label").hidden = info.backends.length < 2;
    if (info.tracking) $("webcam").title = info.tracking;
    buildCornerEditor();
  }
  placeCursor();
  requestFrame();
}

function fillSelect(select, values, current) {
  select.replaceChildren(...values.map((v) => new Option(String(v), String(v), false, v === current)));
}

function setStatus(text, cls) { const s = $("status"); s.textContent = text; s.className = `status ${cls}`; }

// -- the expression pad ------------------------------------------------------------------------------------
function blend(u, v) {
  const [c0, c1, c2, c3] = state.corners;                // top-left, top-right, bottom-left, bottom-right
  return c0.map((_, i) => (1 - u) * (1 - v) * c0[i] + u * (1 - v) * c1[i] + (1 - u) * v * c2[i] + u * v * c3[i]);
}

function placeCursor() {
  $("cursor").style.left = `${state.pad.u * 100}%`;
  $("cursor").style.top = `${state.pad.v * 100}%`;
}

function padEvent(event) {
  const r = $("pad").getBoundingClientRect();
  state.pad.u = Math.min(1, Math.max(0, (event.clientX - r.left) / r.width));
  state.pad.v = Math.min(1, Math.max(0, (event.clientY - r.top) / r.height));
  placeCursor();
  requestFrame(event.timeStamp);                         // latency counts from the input event itself
}

// One render request per animation frame at most (the server's rate limit counts messages), carrying the
// time of the first input event it answers.
function requestFrame(t) {
  if (state.webcam.on || !state.info) return;            // the webcam drives the code while it is on
  if (state.frameT === null) state.frameT = t ?? performance.now();
  if (state.frameQueued) return;
  state.frameQueued = true;
  requestAnimationFrame(() => {
    const t0 = state.frameT;
    state.frameQueued = false; state.frameT = null;
    if (state.webcam.on) return;
    send({ type: "render", code: blend(state.pad.u, state.pad.v).map((x) => +x.toFixed(5)),
           camera: { ...state.camera }, steps: +$("steps").value, backend: $("backend").value }, t0);
  });
}

function buildCornerEditor() {
  const names = state.info.expression_names;
  const box = $("sliders");
  box.replaceChildren();
  const useSliders = state.info.expression_dim <= 32;
  $("corner-json").hidden = useSliders;
  if (useSliders) {
    for (let i = 0; i < state.info.expression_dim; i++) {
      const label = document.createElement("label");
      const input = Object.assign(document.createElement("input"), { type: "range", min: -1, max: 1.5, step: 0.01 });
      const value = document.createElement("span");
      input.dataset.dim = i;
      input.addEventListener("input", () => {
        state.corners[state.selected][i] = +input.value; value.textContent = (+input.value).toFixed(2);
        requestFrame(performance.now());
      });
      label.append(names ? names[i] : `code[${i}]`, input, value);
      box.append(label);
    }
  }
  selectCorner(state.selected);
}

function selectCorner(k) {
  state.selected = k;
  $("corner-label").textContent = state.info ? state.info.corner_labels[k] : String(k + 1);
  document.querySelectorAll(".corner").forEach((b) => b.classList.toggle("selected", +b.dataset.corner === k));
  const code = state.corners[k];
  $("sliders").querySelectorAll("input").forEach((input) => {
    input.value = code[+input.dataset.dim];
    input.nextSibling.textContent = code[+input.dataset.dim].toFixed(2);
  });
  $("corner-json").value = JSON.stringify(code.map((x) => +x.toFixed(4)));
}

// -- camera orbit and zoom ---------------------------------------------------------------------------------
let orbitFrom = null;
function orbitStart(event) { orbitFrom = { x: event.clientX, y: event.clientY }; event.target.setPointerCapture(event.pointerId); }
const clampTo = (x, [lo, hi]) => Math.min(hi, Math.max(lo, x));
// The orbit the protocol accepts, narrowed to the avatar's trained views while "stay in the trained views" is on.
function limits() {
  const range = state.clamp && state.info && state.info.view_range;
  return { yaw: range ? range.yaw : [-180, 180], pitch: range ? range.pitch : [-80, 80],
           distance: range ? range.distance : [0.3, 1.8] };
}
function outsideTrained() {
  const range = state.info && state.info.view_range, cam = state.camera, eps = 1e-6;
  if (!range) return false;
  return ["yaw", "pitch", "distance"].some((k) => cam[k] < range[k][0] - eps || cam[k] > range[k][1] + eps);
}
function placeCamera(yaw, pitch, distance) {
  const lim = limits(), cam = state.camera;
  cam.yaw = clampTo(yaw, lim.yaw);
  cam.pitch = clampTo(pitch, lim.pitch);
  cam.distance = clampTo(distance, lim.distance);
  $("range-warning").hidden = !outsideTrained();
  requestFrame(performance.now());
}
function orbitMove(event) {
  if (!orbitFrom) return;
  const dx = event.clientX - orbitFrom.x, dy = event.clientY - orbitFrom.y, cam = state.camera;
  orbitFrom = { x: event.clientX, y: event.clientY };
  let yaw = cam.yaw - 0.4 * dx;
  if (!(state.clamp && state.info.view_range)) yaw = ((yaw + 540) % 360) - 180;  // all the way round
  placeCamera(yaw, cam.pitch + 0.4 * dy, cam.distance);
}
function zoom(event) {
  event.preventDefault();
  placeCamera(state.camera.yaw, state.camera.pitch, state.camera.distance * Math.exp(0.001 * event.deltaY));
}
function resetView() {
  Object.assign(state.camera, state.info.camera);
  placeCamera(state.camera.yaw, state.camera.pitch, state.camera.distance);
}

// -- webcam ------------------------------------------------------------------------------------------------
async function setWebcam(on) {
  const cam = state.webcam;
  if (on === cam.on) return;
  $("webcam").setAttribute("aria-pressed", String(on));
  $("webcam").textContent = `webcam: ${on ? "on" : "off"}`;
  $("pad").classList.toggle("driven", on);
  $("pad-driven").hidden = !on;
  cam.on = on;
  if (!on) {
    if (cam.stream) cam.stream.getTracks().forEach((t) => t.stop());
    cam.stream = null;
    $("camera-video").hidden = true;
    $("tracked").textContent = "–"; $("tracking-fps").textContent = "–";
    cam.fps = 0; cam.lastTrackedAt = 0;
    requestFrame();
    return;
  }
  try {
    cam.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    const video = $("camera-video");
    video.srcObject = cam.stream;
    await video.play();
    video.hidden = false;                                // the mirrored preview (style.css)
    cam.inFlight = 0;
    pumpWebcam();
  } catch (e) {
    $("error").textContent = `webcam: ${e.message || e}`;
    setWebcam(false);
  }
}

// Send the newest camera image with its capture time, up to WEBCAM_FPS a second and WEBCAM_IN_FLIGHT unanswered
// (a 1 s watchdog forgets lost answers): tracking runs at the camera's pace, not at the render rate.
function pumpWebcam() {
  const cam = state.webcam;
  if (!cam.on) return;
  const video = $("camera-video");
  const now = performance.now();
  if (now - cam.lastSent > 1000) cam.inFlight = 0;
  if (video.videoWidth && cam.inFlight < WEBCAM_IN_FLIGHT && now - cam.lastSent >= 1000 / WEBCAM_FPS - 4) {
    const scale = WEBCAM_WIDTH / video.videoWidth;
    cam.canvas.width = WEBCAM_WIDTH;
    cam.canvas.height = Math.round(video.videoHeight * scale);
    cam.canvas.getContext("2d").drawImage(video, 0, 0, cam.canvas.width, cam.canvas.height);
    cam.inFlight += 1;
    cam.lastSent = now;
    cam.canvas.toBlob(async (blob) => {
      if (!blob || !cam.on) { cam.inFlight = Math.max(0, cam.inFlight - 1); return; }
      const jpeg = await blob.arrayBuffer();
      if (send({ type: "video_frame", jpeg, time: now / 1000, camera: { ...state.camera }, steps: +$("steps").value,
                 backend: $("backend").value }, now) === null) cam.inFlight = Math.max(0, cam.inFlight - 1);
    }, "image/jpeg", 0.85);
  }
  requestAnimationFrame(pumpWebcam);
}

// -- wiring ------------------------------------------------------------------------------------------------
function wire() {
  const pad = $("pad");
  let padDown = false;
  pad.addEventListener("pointerdown", (e) => {
    if (e.target.classList.contains("corner") || state.webcam.on) return;
    padDown = true; pad.setPointerCapture(e.pointerId); padEvent(e);
  });
  pad.addEventListener("pointermove", (e) => { if (padDown) padEvent(e); });
  pad.addEventListener("pointerup", () => { padDown = false; });
  document.querySelectorAll(".corner").forEach((b) => b.addEventListener("click", () => {
    selectCorner(+b.dataset.corner); $("corner-editor").open = true;
  }));
  $("corner-json").addEventListener("change", () => {
    try {
      const code = JSON.parse($("corner-json").value);
      if (!Array.isArray(code) || code.length !== state.info.expression_dim) throw new Error(`need ${state.info.expression_dim} numbers`);
      state.corners[state.selected] = code.map(Number); requestFrame(performance.now());
    } catch (e) { $("error").textContent = `corner code: ${e.message}`; }
  });
  $("corner-from-cursor").addEventListener("click", () => {
    state.corners[state.selected] = blend(state.pad.u, state.pad.v); selectCorner(state.selected);
  });
  $("corners-reset").addEventListener("click", () => {
    state.corners = state.info.corners.map((c) => c.slice()); selectCorner(state.selected); requestFrame(performance.now());
  });
  const view = $("view");
  view.addEventListener("pointerdown", orbitStart);
  view.addEventListener("pointermove", orbitMove);
  view.addEventListener("pointerup", () => { orbitFrom = null; });
  view.addEventListener("wheel", zoom, { passive: false });
  view.addEventListener("load", onImageLoad);
  $("steps").addEventListener("change", () => requestFrame(performance.now()));
  $("backend").addEventListener("change", () => requestFrame(performance.now()));
  $("webcam").addEventListener("click", () => setWebcam(!state.webcam.on));
  $("reset-view").addEventListener("click", resetView);
  $("clamp").addEventListener("change", () => {
    state.clamp = $("clamp").checked;
    placeCamera(state.camera.yaw, state.camera.pitch, state.camera.distance);
  });
}

wire();
connect();
