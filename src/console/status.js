// The status page's behaviour: refresh the live part, and change the threshold through the
// admin API. Served by callmeter itself, no build step.
(function () {
  "use strict";
  var REFRESH_MS = 5000;
  var live = document.getElementById("live");

  function stale(on) {
    var s = document.getElementById("stale");
    if (s) { s.hidden = !on; }
  }

  function refresh() {
    fetch("/?part=live", { cache: "no-store" })
      .then(function (r) {
        if (!r.ok) { throw new Error(r.status); }
        return r.text();
      })
      .then(function (html) { live.innerHTML = html; stale(false); })
      .catch(function () { stale(true); });
  }
  if (live) { setInterval(refresh, REFRESH_MS); }

  var form = document.getElementById("threshold-form");
  if (!form) { return; }
  var result = document.getElementById("form-result");
  var org = form.elements.org;

  function fill() {
    var o = org.options[org.selectedIndex];
    if (!o) { return; }
    form.elements.levels.value = o.dataset.levels || "";
    form.elements.notify.value = o.dataset.notify || "";
    form.elements.min_interval.value = o.dataset.minInterval || "";
  }
  function show(text, ok) {
    result.textContent = text;
    result.className = ok ? "ok" : "error";
  }
  function words(text) {
    return text.split(/[\s,;]+/).filter(function (w) { return w.length > 0; });
  }
  function send(method, body) {
    if (!form.elements.token) { return; }
    var url = "/api/v1/orgs/" + encodeURIComponent(org.value) + "/threshold";
    var init = {
      method: method,
      headers: { "Authorization": "Bearer " + form.elements.token.value },
    };
    if (body) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    show("Saving…", true);
    fetch(url, init)
      .then(function (r) {
        return r.json().then(function (j) { return { ok: r.ok, status: r.status, body: j }; });
      })
      .then(function (r) {
        if (!r.ok) {
          var where = r.body.field ? r.body.field + ": " : "";
          show("Not saved (" + r.status + "): " + where + r.body.message, false);
          return;
        }
        var t = r.body.threshold;
        var o = org.options[org.selectedIndex];
        o.dataset.levels = t ? t.levels.join(", ") : "";
        o.dataset.notify = t ? t.notify.join(", ") : "";
        o.dataset.minInterval = t ? t.min_interval : "4h";
        fill();
        show(method === "DELETE" ? "Back to the threshold of the config file." : "Saved.", true);
        refresh();
      })
      .catch(function (e) { show("Not saved: " + e, false); });
  }

  org.addEventListener("change", fill);
  fill();
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var levels = words(form.elements.levels.value.replace(/\s+%/g, "%")).map(function (w) {
      return /^\d+$/.test(w) ? Number(w) : w;
    });
    var body = { levels: levels, notify: words(form.elements.notify.value) };
    var interval = form.elements.min_interval.value.trim();
    if (interval) { body.min_interval = interval; }
    send("PUT", body);
  });
  var reset = document.getElementById("threshold-reset");
  if (reset) { reset.addEventListener("click", function () { send("DELETE"); }); }
})();
