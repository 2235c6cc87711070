/* A job page: status, progress and per-seed curves, live from the job's event stream. */
(function () {
  "use strict";
  var data = GS.pageData();
  var store = new GS.MetricStore();
  var statusNode = document.getElementById("job-status");
  var progress = document.getElementById("job-progress");
  var progressText = document.getElementById("job-progress-text");
  var latest = document.getElementById("job-latest");
  var TERMINAL = data.terminal_statuses;  // the server's list (models/status.py), not a copy

  function seedColor(seed) {
    var index = data.seeds.indexOf(seed);
    return GS.palette[(index < 0 ? seed : index) % GS.palette.length];
  }

  function chart(id, name, splits, options) {
    var figure = document.getElementById(id);
    if (!figure) return;
    var series = [];
    splits.forEach(function (split) {
      var bySeed = store.perSeed(name, split);
      Object.keys(bySeed).forEach(function (seed) {
        series.push({label: "seed " + seed + " " + split, color: seedColor(Number(seed)), dash: split !== "test",
                     points: bySeed[seed]});
      });
    });
    if (figure.dataset.optional === "true") {  // a metric only some datasets have
      figure.hidden = series.length === 0;
      if (figure.hidden) return;
    }
    GS.lineChart(figure.querySelector(".plot"), series, options);
  }

  var draw = GS.throttle(function () {
    var x = data.steps ? {xMin: 0, xMax: data.steps} : {};  // the axis spans the whole run from the start
    chart("chart-loss", "loss", ["train", "test"], x);
    chart("chart-accuracy", "accuracy", ["train", "test"], Object.assign({yMin: 0, yMax: 1}, x));
    chart("chart-starved", "starved_fraction", ["train"], Object.assign({yMin: 0, yMax: 1}, x));
    chart("chart-conflicting", "conflicting_gradient_share", ["train"], Object.assign({yMin: 0, yMax: 1}, x));
    chart("chart-core-margin", "margin", ["core_only"], x);
    kernelChart("chart-ntk", Object.assign({yMin: 0, yMax: 1}, x));
  });

  /* One line per seed and target of the NTK alignment metrics (ntk_alignment_label, _attribute, _core). */
  function kernelChart(id, options) {
    var figure = document.getElementById(id);
    if (!figure) return;
    var series = [];
    [["label", "6 3"], ["attribute", ""], ["core", "2 2"]].forEach(function (target) {
      var bySeed = store.perSeed("ntk_alignment_" + target[0], "train");
      Object.keys(bySeed).forEach(function (seed) {
        series.push({label: "seed " + seed + " " + target[0], color: seedColor(Number(seed)), dash: target[1] !== "",
                     points: bySeed[seed]});
      });
    });
    figure.hidden = series.length === 0;
    if (!figure.hidden) GS.lineChart(figure.querySelector(".plot"), series, options);
  }

  function showStatus(job) {
    statusNode.textContent = job.status;
    statusNode.dataset.status = job.status;
    statusNode.className = "badge status-" + job.status;
    progress.value = job.progress;
    progressText.textContent = Math.round(100 * job.progress) + "%";
  }

  function showLatest(rows) {
    var last = rows[rows.length - 1];
    if (!last) return;
    var parts = ["seed " + last.seed, "step " + last.step + (data.steps ? "/" + data.steps : "")];
    rows.filter(function (r) { return r.step === last.step && r.seed === last.seed; }).forEach(function (r) {
      if ((r.split === "test" || r.split === "train") && ["accuracy", "loss", "starved_fraction"].indexOf(r.name) >= 0) {
        parts.push(r.split + " " + r.name.replace("_", " ") + " " + r.value.toFixed(3));
      }
    });
    latest.textContent = parts.join(" · ");
  }

  var logs = document.getElementById("job-logs");
  function showLogs(lines) {
    lines.forEach(function (line) {
      var node = document.createElement("span");
      node.className = "log-" + line.level;
      node.textContent = line.at.slice(11, 19) + " " + line.level + " " + line.message + "\n";
      logs.appendChild(node);
    });
  }

  draw();
  window.addEventListener("resize", draw);
  GS.follow("/dashboard/jobs/" + encodeURIComponent(data.id) + "/events", {
    status: showStatus,
    metrics: function (rows) { if (store.add(rows)) { showLatest(rows); draw(); } },
    logs: showLogs,
    end: function () {
      // The page was rendered while the job ran: render it again with the outcome and report.
      if (!data.terminal && TERMINAL.indexOf(statusNode.dataset.status) >= 0) window.location.reload();
    },
    error: function (message) { latest.textContent = message + " (reload the page)"; }
  });
})();
