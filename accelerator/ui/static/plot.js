// A small throughput plot (MB/s over the job's life) on a <canvas>, from the samples collected.

export function drawThroughput(canvas, samples, emptyWords = "collecting samples…") {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth || 240));
  const height = Math.max(1, Math.round(canvas.clientHeight || 56));
  if (canvas.width !== width * ratio || canvas.height !== height * ratio) {
    canvas.width = width * ratio;
    canvas.height = height * ratio;
  }
  const g = canvas.getContext("2d");
  if (!g) return;
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const style = getComputedStyle(canvas);
  const line = style.getPropertyValue("--plot-line").trim() || "#1f6feb";
  const fill = style.getPropertyValue("--plot-fill").trim() || "rgba(31,111,235,0.15)";
  const grid = style.getPropertyValue("--plot-grid").trim() || "#d0d7de";
  const ink = style.getPropertyValue("--plot-ink").trim() || "#57606a";

  g.strokeStyle = grid;
  g.lineWidth = 1;
  g.beginPath();
  g.moveTo(0, height - 0.5);
  g.lineTo(width, height - 0.5);
  g.stroke();

  if (samples.length < 2) {
    g.fillStyle = ink;
    g.font = "11px system-ui, sans-serif";
    g.fillText(emptyWords, 6, height / 2 + 4);
    return;
  }
  const t0 = samples[0].t;
  const span = Math.max(1, samples[samples.length - 1].t - t0);
  const top = Math.max(0.01, ...samples.map((s) => s.v)) * 1.15;
  const x = (t) => ((t - t0) / span) * (width - 2) + 1;
  const y = (v) => height - 1 - (v / top) * (height - 14);

  g.beginPath();
  g.moveTo(x(samples[0].t), height - 1);
  for (const s of samples) g.lineTo(x(s.t), y(s.v));
  g.lineTo(x(samples[samples.length - 1].t), height - 1);
  g.closePath();
  g.fillStyle = fill;
  g.fill();

  g.beginPath();
  samples.forEach((s, i) => (i ? g.lineTo(x(s.t), y(s.v)) : g.moveTo(x(s.t), y(s.v))));
  g.strokeStyle = line;
  g.lineWidth = 1.5;
  g.stroke();

  g.fillStyle = ink;
  g.font = "11px system-ui, sans-serif";
  g.fillText(`peak ${Math.max(...samples.map((s) => s.v)).toFixed(2)} MB/s`, 6, 11);
}
