/* The comparison page: both jobs' curves (mean over seeds) on shared axes, live while they run. */
(function () {
  "use strict";
  var data = GS.pageData();
  if (!data.jobs || data.jobs.length !== 2) return;
  // The sides' colours live in dashboard.css (--side-a, --side-b), away from the group plots' blue and orange.
  var style = getComputedStyle(document.documentElement);
  var COLORS = {A: style.getPropertyValue("--side-a").trim(), B: style.getPropertyValue("--side-b").trim()};
  var stores = {};

  function chart(id, name, splits, options) {
    var figure = document.getElementById(id);
    var series = [];
    data.jobs.forEach(function (job) {
      splits.forEach(function (split) {
        series.push({label: job.label + " " + split, color: COLORS[job.label], dash: split !== "test",
                     points: stores[job.label].meanOverSeeds(name, split)});
      });
    });
    GS.lineChart(figure.querySelector(".plot"), series, options);
  }

  var steps = Math.max.apply(null, data.jobs.map(function (job) { return job.steps || 0; }));
  var x = steps ? {xMin: 0, xMax: steps} : {};

  var draw = GS.throttle(function () {
    chart("chart-accuracy", "accuracy", ["train", "test"], Object.assign({yMin: 0, yMax: 1}, x));
    chart("chart-starved", "starved_fraction", ["train"], Object.assign({yMin: 0, yMax: 1}, x));
    chart("chart-loss", "loss", ["train", "test"], x);
  });

  data.jobs.forEach(function (job) {
    stores[job.label] = new GS.MetricStore();
    GS.follow("/dashboard/jobs/" + encodeURIComponent(job.id) + "/events", {
      metrics: function (rows) { if (stores[job.label].add(rows)) draw(); }
    });
  });
  draw();
  window.addEventListener("resize", draw);
})();
