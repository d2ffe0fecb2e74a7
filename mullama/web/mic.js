// The microphone: capture, 16 kHz mono, and utterances cut out of it by loudness.
//
// Chromium sends a streamed request body (fetch with a ReadableStream) only
// over HTTP/2, and the daemon speaks HTTP/1.1, so the page cannot stream the
// microphone into POST /api/voice as it is captured. It finds each utterance
// itself instead (speech is louder than the room), and hands the utterance's
// samples, with a little silence either side, to `onUtterance`; the daemon's
// own VAD then trims them exactly.

/** The rate the daemon's speech models hear at. */
export const SPEECH_RATE = 16000;
/** Samples in one loudness frame (20 ms). */
const FRAME = SPEECH_RATE / 50;
/** RMS above which a frame is speech, at the least (about -36 dBFS)... */
const MIN_THRESHOLD = 0.016;
/** ...and how far above the room's own level it must be. */
const OVER_NOISE = 3;
/** Loud frames in a row that start an utterance (60 ms: a click is not speech). */
const START_FRAMES = 3;
/** Quiet frames in a row that end one (0.7 s: the pauses between words are shorter). */
const END_FRAMES = 35;
/** Frames kept from before the start was seen (0.3 s, the loud ones that showed it included), so that a soft
 * first sound is not cut. */
const PREROLL_FRAMES = 15;
/** The longest utterance (30 s, Whisper's window): a longer one is cut there. */
const MAX_FRAMES = 30 * 50;

/** Whether a model (from modelsWithInfo) is a speech model. */
export function canHear(model) {
  return (model.info?.capabilities || []).includes("speech");
}

/** Samples in [-1, 1] as 16-bit little-endian PCM bytes (what POST /api/voice reads by default). */
export function pcm16(samples) {
  const view = new DataView(new ArrayBuffer(samples.length * 2));
  samples.forEach((sample, index) => {
    view.setInt16(index * 2, Math.round(Math.max(-1, Math.min(1, sample)) * 32767), true);
  });
  return new Uint8Array(view.buffer);
}

/** Cuts a 16 kHz stream into utterances: `feed` samples, `flush` at the end. */
export class Utterances {
  constructor({ onStart, onUtterance }) {
    this.onStart = onStart;
    this.onUtterance = onUtterance;
    this.pending = new Float32Array(0);
    this.before = [];
    this.frames = null;
    this.loud = 0;
    this.quiet = 0;
    this.noise = 0;
  }

  feed(samples) {
    const joined = new Float32Array(this.pending.length + samples.length);
    joined.set(this.pending);
    joined.set(samples, this.pending.length);
    let offset = 0;
    for (; offset + FRAME <= joined.length; offset += FRAME) this.frame(joined.slice(offset, offset + FRAME));
    this.pending = joined.slice(offset);
  }

  /** End the utterance going on, if any (the user stopped listening). */
  flush() {
    if (this.frames) this.finish();
  }

  frame(frame) {
    let energy = 0;
    for (const sample of frame) energy += sample * sample;
    const level = Math.sqrt(energy / frame.length);
    const loud = level > Math.max(MIN_THRESHOLD, this.noise * OVER_NOISE);
    if (!this.frames) {
      // The room's level, followed slowly while nobody speaks.
      if (!loud) this.noise = this.noise * 0.98 + level * 0.02;
      this.before.push(frame);
      if (this.before.length > PREROLL_FRAMES) this.before.shift();
      this.loud = loud ? this.loud + 1 : 0;
      if (this.loud >= START_FRAMES) {
        this.frames = this.before;
        this.before = [];
        this.quiet = 0;
        this.onStart();
      }
      return;
    }
    this.frames.push(frame);
    this.quiet = loud ? 0 : this.quiet + 1;
    if (this.quiet >= END_FRAMES || this.frames.length >= MAX_FRAMES) this.finish();
  }

  finish() {
    const frames = this.frames;
    this.frames = null;
    this.loud = 0;
    const samples = new Float32Array(frames.length * FRAME);
    frames.forEach((frame, index) => samples.set(frame, index * FRAME));
    this.onUtterance(samples);
  }
}

/**
 * Start listening: `onStart()` when speech begins, `onUtterance(samples)` (16 kHz Float32Array) when it ends.
 * Resolves to `stop(handOver)`, which stops listening (and hands the utterance going on to `onUtterance`
 * when `handOver`); rejects when the browser gives no microphone.
 */
export async function listen({ onStart, onUtterance }) {
  const media = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  let context;
  try {
    context = new AudioContext();
    // A context made after the click's await may start suspended (the autoplay rules).
    await context.resume();
    await context.audioWorklet.addModule("/ui/mic-worklet.js");
    const node = new AudioWorkletNode(context, "mullama-downsampler", {
      numberOfInputs: 1, numberOfOutputs: 0, processorOptions: { rate: SPEECH_RATE },
    });
    const utterances = new Utterances({ onStart, onUtterance });
    node.port.onmessage = (event) => utterances.feed(event.data);
    context.createMediaStreamSource(media).connect(node);
    return (handOver) => {
      node.port.onmessage = null;
      media.getTracks().forEach((track) => track.stop());
      context.close();
      if (handOver) utterances.flush();
    };
  } catch (error) {
    media.getTracks().forEach((track) => track.stop());
    context?.close();
    throw error;
  }
}
