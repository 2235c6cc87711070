/* Small SVG line charts and a metric store fed by Server-Sent Events. No dependencies. */
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"];

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceStep(span, count) {
    var raw = span / Math.max(count, 1);
    var power = Math.pow(10, Math.floor(Math.log10(raw)));
    var unit = raw / power;
    return (unit >= 5 ? 10 : unit >= 2 ? 5 : unit >= 1 ? 2 : 1) * power;
  }

  function ticks(min, max, count) {
    if (!(max > min)) { max = min + 1; }
    var step = niceStep(max - min, count);
    var out = [];
    for (var v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }

  function label(value) {
    var abs = Math.abs(value);
    if (abs !== 0 && (abs >= 10000 || abs < 0.001)) return value.toExponential(0);
    return String(+value.toPrecision(3));
  }

  /* series: [{label, color, dash, points: [[x, y], ...]}]; options: {xMin, xMax, yMin, yMax, xLabel, height}. */
  function lineChart(container, series, options) {
    options = options || {};
    var width = Math.max(container.clientWidth || 0, 280), height = options.height || 240;
    var m = {left: 48, right: 22, top: 10, bottom: 34};
    var xs = [], ys = [];
    series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); if (isFinite(p[1])) ys.push(p[1]); }); });
    container.textContent = "";
    var svg = el("svg", {width: width, height: height, viewBox: "0 0 " + width + " " + height, role: "img",
                         "class": "line-chart"}, container);
    if (!xs.length) {
      var empty = el("text", {x: width / 2, y: height / 2, "text-anchor": "middle", "class": "empty"}, svg);
      empty.textContent = "waiting for metrics…";
      return svg;
    }
    var xMin = options.xMin !== undefined ? options.xMin : Math.min.apply(null, xs);
    var xMax = options.xMax !== undefined ? options.xMax : Math.max.apply(null, xs);
    var yMin = options.yMin !== undefined ? options.yMin : Math.min.apply(null, ys);
    var yMax = options.yMax !== undefined ? options.yMax : Math.max.apply(null, ys);
    if (options.yMin === undefined || options.yMax === undefined) {
      var pad = (yMax - yMin) * 0.05 || 0.05;
      if (options.yMin === undefined) yMin -= pad;
      if (options.yMax === undefined) yMax += pad;
    }
    if (xMax === xMin) xMax = xMin + 1;
    var plotW = width - m.left - m.right, plotH = height - m.top - m.bottom;
    function X(v) { return m.left + (v - xMin) / (xMax - xMin) * plotW; }
    function Y(v) { return m.top + (1 - (v - yMin) / (yMax - yMin)) * plotH; }

    ticks(yMin, yMax, 5).forEach(function (t) {
      if (t < yMin || t > yMax) return;
      el("line", {x1: m.left, x2: width - m.right, y1: Y(t), y2: Y(t), "class": "grid"}, svg);
      var text = el("text", {x: m.left - 6, y: Y(t) + 4, "text-anchor": "end", "class": "tick"}, svg);
      text.textContent = label(t);
    });
    ticks(xMin, xMax, Math.max(2, Math.floor(plotW / 80))).forEach(function (t) {
      if (t < xMin || t > xMax) return;
      el("line", {x1: X(t), x2: X(t), y1: m.top + plotH, y2: m.top + plotH + 4, "class": "axis"}, svg);
      var text = el("text", {x: X(t), y: m.top + plotH + 16, "text-anchor": "middle", "class": "tick"}, svg);
      text.textContent = label(t);
    });
    el("rect", {x: m.left, y: m.top, width: plotW, height: plotH, "class": "frame"}, svg);
    var xTitle = el("text", {x: m.left + plotW / 2, y: height - 4, "text-anchor": "middle", "class": "axis-title"}, svg);
    xTitle.textContent = options.xLabel || "step";

    series.forEach(function (s) {
      var points = s.points.filter(function (p) { return isFinite(p[1]); });
      if (!points.length) return;
      var d = points.map(function (p, i) { return (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1); });
      var path = el("path", {d: d.join(" "), stroke: s.color, "class": "series", "data-label": s.label}, svg);
      if (s.dash) path.setAttribute("stroke-dasharray", "5 4");
      if (points.length === 1) el("circle", {cx: X(points[0][0]), cy: Y(points[0][1]), r: 3, fill: s.color}, svg);
    });

    var legend = document.createElement("div");
    legend.className = "legend";
    series.forEach(function (s) {
      if (!s.points.length) return;
      var item = document.createElement("span");
      var swatch = document.createElement("span");
      swatch.className = "swatch-line" + (s.dash ? " dashed" : "");
      swatch.style.borderColor = s.color;
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(s.label));
      legend.appendChild(item);
    });
    container.appendChild(legend);
    return svg;
  }

  /* Metric rows de-duplicated by (step, name, seed, split): a reconnecting stream sends them again. */
  function MetricStore() { this.rows = new Map(); }
  MetricStore.prototype.add = function (rows) {
    var added = 0, self = this;
    rows.forEach(function (r) {
      var key = r.step + "|" + r.name + "|" + r.seed + "|" + r.split;
      if (!self.rows.has(key)) { self.rows.set(key, r); added += 1; }
    });
    return added;
  };
  MetricStore.prototype.select = function (name, split) {
    var out = [];
    this.rows.forEach(function (r) { if (r.name === name && (split === undefined || r.split === split)) out.push(r); });
    return out;
  };
  MetricStore.prototype.perSeed = function (name, split) {
    var bySeed = {};
    this.select(name, split).forEach(function (r) { (bySeed[r.seed] = bySeed[r.seed] || []).push([r.step, r.value]); });
    Object.keys(bySeed).forEach(function (k) { bySeed[k].sort(function (a, b) { return a[0] - b[0]; }); });
    return bySeed;
  };
  MetricStore.prototype.meanOverSeeds = function (name, split) {
    var byStep = {};
    this.select(name, split).forEach(function (r) { (byStep[r.step] = byStep[r.step] || []).push(r.value); });
    return Object.keys(byStep).map(Number).sort(function (a, b) { return a - b; }).map(function (step) {
      var values = byStep[step];
      return [step, values.reduce(function (a, b) { return a + b; }, 0) / values.length];
    });
  };

  /* Follow a job's event stream; handlers: status(job), metrics(rows), logs(lines), end(), error(message). */
  function follow(url, handlers) {
    var source = new EventSource(url);
    source.addEventListener("status", function (e) { if (handlers.status) handlers.status(JSON.parse(e.data)); });
    source.addEventListener("metrics", function (e) { if (handlers.metrics) handlers.metrics(JSON.parse(e.data)); });
    source.addEventListener("logs", function (e) { if (handlers.logs) handlers.logs(JSON.parse(e.data)); });
    source.addEventListener("end", function () { source.close(); if (handlers.end) handlers.end(); });
    source.onerror = function () {
      // The browser reconnects by itself unless the server refused (signed out, job deleted).
      if (source.readyState === EventSource.CLOSED && handlers.error) handlers.error("live updates stopped");
    };
    return source;
  }

  function throttle(fn) {
    var pending = false;
    return function () {
      if (pending) return;
      pending = true;
      window.requestAnimationFrame(function () { pending = false; fn(); });
    };
  }

  function pageData() {
    var node = document.getElementById("page-data");
    return node ? JSON.parse(node.textContent) : {};
  }

  window.GS = {lineChart: lineChart, MetricStore: MetricStore, follow: follow, throttle: throttle,
               pageData: pageData, palette: PALETTE};
})();
