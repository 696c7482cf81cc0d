// Pages marked data-refresh reload their main block every few seconds (no full reload).
(function () {
  const main = document.querySelector("main[data-refresh]");
  if (!main) return;
  const every = parseInt(main.dataset.refresh, 10) * 1000;
  setInterval(async function () {
    try {
      const r = await fetch(location.href, { headers: { "X-Partial": "1" }, credentials: "same-origin" });
      // A session that ended (logout elsewhere, idle timeout) redirects to the login page:
      // go there instead of showing stale data.
      if (r.redirected && new URL(r.url).pathname === "/login") location.href = r.url;
      else if (r.ok && !r.redirected) main.innerHTML = await r.text();
    } catch (e) { /* next tick tries again */ }
  }, every);
})();
