// The result viewer: one server-rendered PNG per slice (no DICOM code, no CDN).
// Slider, arrow buttons and keys, the mouse wheel over the image, the overlay toggle,
// the window choice and the legend's "show" buttons all change which PNG is shown.
(function () {
  const root = document.getElementById("viewer");
  if (!root) return;
  const id = root.dataset.result;
  const count = parseInt(root.dataset.slices, 10);
  const img = document.getElementById("slice");
  const range = document.getElementById("slice-range");
  const label = document.getElementById("slice-label");
  const overlay = document.getElementById("overlay");
  const windowSelect = document.getElementById("window");
  let z = parseInt(root.dataset.default, 10);

  function show(next) {
    z = Math.max(0, Math.min(count - 1, next));
    range.value = z;
    label.textContent = "slice " + (z + 1) + " / " + count;
    img.alt = "slice " + (z + 1) + " of " + count;
    img.src = "/api/results/" + id + "/slices/" + z + ".png?overlay=" +
      (overlay.checked ? "1" : "0") + "&window=" + encodeURIComponent(windowSelect.value);
  }
  range.addEventListener("input", function () { show(parseInt(range.value, 10)); });
  document.getElementById("prev").addEventListener("click", function () { show(z - 1); });
  document.getElementById("next").addEventListener("click", function () { show(z + 1); });
  overlay.addEventListener("change", function () { show(z); });
  windowSelect.addEventListener("change", function () { show(z); });
  img.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    show(z + (ev.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  document.addEventListener("keydown", function (ev) {
    const t = ev.target;
    if (t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
        (t.tagName === "INPUT" && !["range", "checkbox", "button"].includes(t.type))) return;
    if (ev.key === "ArrowUp" || ev.key === "ArrowLeft") { ev.preventDefault(); show(z - 1); }
    if (ev.key === "ArrowDown" || ev.key === "ArrowRight") { ev.preventDefault(); show(z + 1); }
  });
  document.querySelectorAll("#legend button.goto").forEach(function (b) {
    b.addEventListener("click", function () { show(parseInt(b.dataset.slice, 10)); });
  });
})();
