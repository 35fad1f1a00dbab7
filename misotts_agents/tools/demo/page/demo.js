"use strict";
// The demo page: WebRTC to the server that served it (SmallWebRTC signalling at /api/offer), RTVI
// messages on the data channel, and window.miso holding what the page measured (read by the tests).
const miso = window.miso = {state: "idle", connectionState: "new", maxRms: 0, loudFrames: 0,
  firstAudioAt: null, events: [], errors: [], messages: [], turns: {}, toneAcks: [], heard: [],
  pcId: null, info: null, voice: null};
const $ = id => document.getElementById(id);
const t0 = performance.now();
const now = () => (performance.now() - t0) / 1000;
function note(text) {
  const s = now().toFixed(2);
  miso.events.push(s + " " + text);
  const line = document.createElement("div"); line.textContent = s + "  " + text;
  $("log").appendChild(line); $("log").scrollTop = 1e9;
}
function setState(s) { miso.state = s; $("state").textContent = s; }

// -- what is real --------------------------------------------------------------------------------
function showInfo(info) {
  miso.info = info; $("description").textContent = info.description;
  const names = {stt: "Speech recognition", llm: "Replies", tts: "Voice"};
  for (const [key, part] of Object.entries(info.parts || {})) {
    const li = document.createElement("li"), tag = document.createElement("span");
    tag.className = part.real ? "real" : "standin"; tag.textContent = part.real ? "real" : "stand-in";
    li.append((names[key] || key) + ": " + part.what + " ", tag);
    $("parts").appendChild(li);
  }
  $("tone").checked = !!info.tone_conditioning;
}

// -- levels --------------------------------------------------------------------------------------
let ctx = null;
function meter(stream, barId, onLevel) {
  const src = ctx.createMediaStreamSource(stream), an = ctx.createAnalyser();
  an.fftSize = 2048; src.connect(an);
  const buf = new Float32Array(an.fftSize);
  setInterval(() => {
    an.getFloatTimeDomainData(buf);
    let sum = 0; for (const v of buf) sum += v * v;
    const rms = Math.sqrt(sum / buf.length);
    $(barId).style.width = Math.min(100, rms * 400) + "%";
    if (onLevel) onLevel(rms);
  }, 50);
}
let userStoppedAt = null;  // when the server said your turn ended; the next bot audio heard is timed from it
function onBotLevel(rms) {
  miso.maxRms = Math.max(miso.maxRms, rms);
  if (rms > 0.01) {
    miso.loudFrames += 1;
    if (miso.firstAudioAt === null) { miso.firstAudioAt = now(); note("hearing MisoTTS"); }
    if (userStoppedAt !== null) { miso.heard.push(now() - userStoppedAt); userStoppedAt = null; pairHeard(); }
  }
}

// -- turns ---------------------------------------------------------------------------------------
const fmt = s => (s === null || s === undefined) ? "" : s.toFixed(2) + " s";
function turnRow(n) {
  let row = document.getElementById("turn-" + n);
  if (!row) {
    row = document.createElement("tr"); row.id = "turn-" + n;
    for (const c of ["n", "user", "bot", "first", "heard", "tone"]) {
      const td = document.createElement("td"); td.dataset.col = c;
      if (c === "n" || c === "first" || c === "heard") td.className = "num";
      row.appendChild(td);
    }
    $("turns").tBodies[0].appendChild(row);
  }
  return row;
}
function drawTurn(t) {
  const cells = Object.fromEntries([...turnRow(t.turn).children].map(td => [td.dataset.col, td]));
  cells.n.textContent = t.turn;
  cells.user.textContent = t.user === null ? "(greeting)" : t.user;
  cells.bot.textContent = (t.bot || "...") + (t.stage === "interrupted" ? " [interrupted]" : "");
  cells.first.textContent = t.first_audio_after_user_s !== null ? fmt(t.first_audio_after_user_s) +
    " (TTS " + fmt(t.tts_first_audio_s) + ")" : "TTS " + fmt(t.tts_first_audio_s);
  cells.heard.textContent = fmt(t.heard_s);
  cells.tone.textContent = t.tone_conditioning ? "on (" + t.context_turns + " turns)" : "off";
}
function pairHeard() {  // the browser's figure goes to the oldest answered turn still without one
  for (const t of Object.values(miso.turns)) {
    if (!miso.heard.length) return;
    if (t.user !== null && t.heard_s === undefined) { t.heard_s = miso.heard.shift(); drawTurn(t); }
  }
}
function onTurn(d) {
  const t = miso.turns[d.turn] = Object.assign(miso.turns[d.turn] || {}, d);
  if (d.stage === "speaking") note("turn " + d.turn + ": first audio " + fmt(d.tts_first_audio_s) + " after the TTS request");
  pairHeard(); drawTurn(t);
}

// -- the data channel (RTVI) ---------------------------------------------------------------------
let dc = null, msgId = 0;
function send(type, data) {
  if (!dc || dc.readyState !== "open") return false;
  dc.send(JSON.stringify({label: "rtvi-ai", type, id: String(++msgId), data}));
  return true;
}
function rtvi(msg) {
  miso.messages.push(msg.type);
  const d = msg.data || {};
  if (msg.type === "bot-ready") note("bot ready");
  else if (msg.type === "user-started-speaking") { note("you started speaking"); userStoppedAt = null; }
  else if (msg.type === "user-stopped-speaking") { note("you stopped speaking"); userStoppedAt = now(); }
  else if (msg.type === "user-transcription" && d.final) note("you: " + d.text);
  else if (msg.type === "bot-output" && d.text) note("bot: " + d.text);
  else if (msg.type === "server-message" && d.type === "miso-turn") onTurn(d);
  else if (msg.type === "server-message" && d.type === "tone-conditioning") {
    miso.toneAcks.push(d.on); note("tone conditioning " + (d.on ? "on" : "off") + " from the next reply");
  }
}
$("tone").onchange = () => {
  if (!send("client-message", {t: "tone-conditioning", d: {on: $("tone").checked}})) note("not connected");
};

// -- voice upload --------------------------------------------------------------------------------
$("voice-send").onclick = async () => {
  const file = $("voice-file").files[0], text = $("voice-text").value.trim();
  if (!file || !text) { $("voice-state").textContent = "choose a clip and type its transcript"; return; }
  $("voice-state").textContent = "uploading...";
  const url = "/api/voice?pc_id=" + encodeURIComponent(miso.pcId) + "&text=" + encodeURIComponent(text);
  const res = await fetch(url, {method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"}});
  const body = await res.json();
  miso.voice = body;
  $("voice-state").textContent = res.ok ? "voice set: " + body.seconds + " s clip, " + body.applies : "error: " + body.error;
  note(res.ok ? "voice clip in use " + body.applies : "voice clip refused: " + body.error);
};

// -- connecting ----------------------------------------------------------------------------------
async function waitIce(pc) {
  if (pc.iceGatheringState === "complete") return;
  await new Promise(resolve => {
    const timer = setTimeout(resolve, 3000);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}
async function start() {
  $("talk").disabled = true; setState("starting");
  try {
    ctx = new AudioContext(); miso.audioContextRate = ctx.sampleRate;
    const mic = await navigator.mediaDevices.getUserMedia({audio: {echoCancellation: true,
      noiseSuppression: true, autoGainControl: true}});
    note("microphone: " + mic.getAudioTracks()[0].label);
    meter(mic, "mic");
    const pc = window.pc = new RTCPeerConnection({iceServers: []});
    pc.addTransceiver(mic.getAudioTracks()[0], {direction: "sendrecv", streams: [mic]});  // index 0: audio
    pc.addTransceiver("video", {direction: "recvonly"});                                   // index 1: video
    dc = pc.createDataChannel("chat");
    dc.onopen = () => {
      send("client-ready", {version: "2.2.0", about: {library: "misotts-demo"}});
      $("tone").disabled = false;
      setInterval(() => { if (dc.readyState === "open") dc.send("ping: " + Date.now()); }, 1000);
    };
    dc.onmessage = ev => { try { const m = JSON.parse(ev.data); if (m.label === "rtvi-ai") rtvi(m); } catch (e) {} };
    pc.ontrack = ev => {
      if (ev.track.kind !== "audio") return;
      const stream = new MediaStream([ev.track]);
      $("player").srcObject = stream; $("player").play().catch(e => note("autoplay: " + e));
      meter(stream, "bot", onBotLevel);
    };
    pc.onconnectionstatechange = () => {
      miso.connectionState = pc.connectionState; note("connection " + pc.connectionState);
      if (pc.connectionState === "connected") setState("connected: speak now");
      if (pc.connectionState === "failed" || pc.connectionState === "closed") setState(pc.connectionState);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitIce(pc);
    const res = await fetch("/api/offer", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
    if (!res.ok) throw new Error("offer rejected: HTTP " + res.status);
    const answer = await res.json();
    miso.pcId = answer.pc_id;
    $("voice-send").disabled = false; $("voice-state").textContent = "";
    await pc.setRemoteDescription({type: answer.type, sdp: answer.sdp});
    setState("connecting");
  } catch (e) {
    miso.errors.push(String(e)); note("error: " + e); setState("error"); $("talk").disabled = false;
  }
}
async function stats() {
  if (!window.pc) return null;
  const out = {};
  (await window.pc.getStats()).forEach(r => {
    if (r.type === "inbound-rtp" && r.kind === "audio") out.inbound = r;
    if (r.type === "codec" && (r.mimeType || "").toLowerCase() === "audio/opus") out.codec = r;
  });
  return out;
}
window.misoStats = stats;
fetch("/api/info").then(r => r.json()).then(showInfo).catch(e => note("info: " + e));
$("talk").onclick = start;
if (new URLSearchParams(location.search).has("autostart")) start();
