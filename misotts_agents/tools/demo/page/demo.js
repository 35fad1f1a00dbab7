"use strict";
const miso = window.miso = {state: "idle", connectionState: "new", maxRms: 0, loudFrames: 0,
  firstAudioAt: null, events: [], errors: [], messages: []};
const $ = id => document.getElementById(id);
const t0 = performance.now();
function note(text) {
  const s = ((performance.now() - t0) / 1000).toFixed(2);
  miso.events.push(s + " " + text);
  const line = document.createElement("div"); line.textContent = s + "  " + text;
  $("log").appendChild(line); $("log").scrollTop = 1e9;
}
function setState(s) { miso.state = s; $("state").textContent = s; }
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
function onBotLevel(rms) {
  miso.maxRms = Math.max(miso.maxRms, rms);
  if (rms > 0.01) {
    miso.loudFrames += 1;
    if (miso.firstAudioAt === null) { miso.firstAudioAt = (performance.now() - t0) / 1000; note("hearing MisoTTS"); }
  }
}
function rtvi(msg) {
  miso.messages.push(msg.type);
  const d = msg.data || {};
  if (msg.type === "bot-ready") note("bot ready");
  else if (msg.type === "user-started-speaking") note("you started speaking");
  else if (msg.type === "user-stopped-speaking") note("you stopped speaking");
  else if (msg.type === "user-transcription" && d.final) note("you: " + d.text);
  else if (msg.type === "bot-output" && d.text) note("bot: " + d.text);
}
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
    const dc = pc.createDataChannel("chat");
    dc.onopen = () => {
      dc.send(JSON.stringify({label: "rtvi-ai", type: "client-ready", id: "1",
        data: {version: "2.2.0", about: {library: "misotts-demo"}}}));
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
fetch("/api/info").then(r => r.json()).then(info => {
  miso.info = info; $("description").textContent = info.description;
}).catch(e => note("info: " + e));
$("talk").onclick = start;
if (new URLSearchParams(location.search).has("autostart")) start();
