// Auto-refresh: an element with data-refresh="N" is fetched again every N seconds and replaced
// in place (the page keeps its focus and scroll). It stops when the new copy has no data-refresh
// (an operation that reached done or failed).
(function () {
  "use strict";
  function schedule(element) {
    var seconds = parseFloat(element.getAttribute("data-refresh"));
    if (!(seconds > 0)) { return; }
    window.setTimeout(function () { refresh(element); }, seconds * 1000);
  }
  function refresh(element) {
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById(element.id);
        if (!fresh) { return; }
        element.innerHTML = fresh.innerHTML;
        if (fresh.hasAttribute("data-refresh")) {
          element.setAttribute("data-refresh", fresh.getAttribute("data-refresh"));
          schedule(element);
        } else {
          element.removeAttribute("data-refresh");
        }
      })
      .catch(function () { window.setTimeout(function () { refresh(element); }, 5000); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(schedule);
  });
})();
