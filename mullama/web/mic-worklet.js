// The microphone's audio thread: mixes to mono and brings the device's rate down to 16 kHz.
//
// Each output sample is the mean of the input samples of its period (a box
// filter), which keeps most of the aliasing of plain decimation out of the
// speech band. Samples go to the page in 0.1 s batches, so that the main
// thread wakes ten times a second rather than at every 128-frame quantum.

const BATCH = 1600;

class Downsampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    // `sampleRate` is the AudioWorkletGlobalScope's: the context's (the device's) rate.
    this.step = sampleRate / options.processorOptions.rate;
    this.position = 0;
    this.sum = 0;
    this.count = 0;
    this.batch = new Float32Array(BATCH);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0] || [];
    if (!channels.length) return true;
    const frames = channels[0].length;
    for (let i = 0; i < frames; i += 1) {
      let value = 0;
      for (const channel of channels) value += channel[i];
      this.sum += value / channels.length;
      this.count += 1;
      this.position += 1;
      if (this.position >= this.step) {
        this.position -= this.step;
        this.batch[this.filled] = this.sum / this.count;
        this.filled += 1;
        this.sum = 0;
        this.count = 0;
        if (this.filled === BATCH) {
          this.port.postMessage(this.batch, [this.batch.buffer]);
          this.batch = new Float32Array(BATCH);
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("mullama-downsampler", Downsampler);
