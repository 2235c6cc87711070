/* The job list refreshes itself while a job is queued or running, unless you are filling in a form. */
(function () {
  "use strict";
  if (document.body.dataset.active !== "1") return;
  function busy() {
    var focused = document.activeElement;
    return document.querySelector("#compare-form input[type=radio]:checked") ||
      document.querySelector("#new-job[open]") || (focused && focused.form);
  }
  window.setInterval(function () { if (!busy()) window.location.reload(); }, 3000);
})();
