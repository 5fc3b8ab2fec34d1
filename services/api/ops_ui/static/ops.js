// The operators' dashboard: refresh its live sections every few seconds. Nothing else runs
// here; every action is a plain form the server answers.
(function () {
  "use strict";
  const body = document.body;
  const page = body.dataset.page;
  const seconds = Number(body.dataset.refresh);
  if (!page || !seconds) return; // the sign-in page: nothing to refresh

  // After a refused action the address is the form's; a reload must show the page instead
  // of sending the form again.
  if (location.pathname !== page) history.replaceState(null, "", page);

  const toggle = document.getElementById("auto-refresh");
  const stamp = document.getElementById("refreshed");
  let busy = false;

  // A section the operator is typing into keeps what they typed until they are done.
  function inUse(section) {
    const active = document.activeElement;
    if (active && section.contains(active) && active.matches("input, select, textarea")) {
      return true;
    }
    return Array.from(section.querySelectorAll("input:not([type=hidden])")).some(
      (input) => input.value !== input.defaultValue,
    );
  }

  async function refresh() {
    if (busy || document.hidden || (toggle && !toggle.checked)) return;
    busy = true;
    try {
      const answer = await fetch(page, {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
        cache: "no-store",
      });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
      if (!fresh.body.dataset.refresh) {
        location.assign(page); // signed out meanwhile: show the sign-in form
        return;
      }
      for (const section of document.querySelectorAll("[data-live]")) {
        const next = fresh.getElementById(section.id);
        if (next && !inUse(section)) section.replaceWith(document.importNode(next, true));
      }
      if (stamp) stamp.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      if (stamp) stamp.textContent = "refresh failed (" + error.message + ")";
    } finally {
      busy = false;
    }
  }

  setInterval(refresh, seconds * 1000);
})();
