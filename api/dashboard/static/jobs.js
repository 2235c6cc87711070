/* The job list refreshes itself while a job is queued or running, unless you are filling in a form. */
(function () {
  "use strict";
  if (document.body.dataset.active !== "1") return;
  function busy() {
    var active = document.activeElement;
    var picked = document.querySelector("#compare-form input[type=radio]:checked");
    var open = document.querySelector("#new-job[open]");
    return picked || (open && document.querySelector("#jobs-table tbody tr[data-job-id]")) ||
      (active && active !== document.body && active.form);
  }
  window.setInterval(function () { if (!busy()) window.location.reload(); }, 3000);
})();
