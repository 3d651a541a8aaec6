// Runs before the page paints, so a dark-theme user never sees a white flash.
(function () {
  var saved = null;
  try { saved = localStorage.getItem("nanoseek.theme"); } catch (e) { /* storage disabled */ }
  var dark = saved ? saved === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
})();
