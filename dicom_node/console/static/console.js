// srnode console: retry/cancel buttons, picture sizes, dashboard refresh. No dependencies.
"use strict";

function srnodeAct(button) {
  const job = button.dataset.job;
  const action = button.dataset.action;
  const message = document.getElementById("action-message");
  button.disabled = true;
  fetch(`/api/jobs/${job}/${action}`, {method: "POST", credentials: "same-origin",
                                       headers: {"Accept": "application/json"}})
    .then((r) => r.json().then((body) => ({ok: r.ok, body: body})))
    .then(({ok, body}) => {
      if (!ok) {
        message.textContent = `${action} refused: ${body.detail || body.error}`;
        message.className = "error";
        button.disabled = false;
        return;
      }
      document.querySelectorAll("[data-job-state]").forEach((el) => {
        el.textContent = body.state;
        el.className = `state state-${body.state}`;
      });
      message.textContent = `job ${body.id}: ${body.previous_state} \u2192 ${body.state}`;
      message.className = "ok";
      window.setTimeout(() => window.location.reload(), 1500);
    })
    .catch((err) => {
      message.textContent = `${action} failed: ${err}`;
      message.className = "error";
      button.disabled = false;
    });
}

function srnodeShowSize(img) {
  const label = img.parentElement.querySelector(".size");
  if (label && img.naturalWidth) {
    label.textContent = `${img.naturalWidth}\u00d7${img.naturalHeight}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("button[data-action]").forEach((b) => {
    b.addEventListener("click", () => srnodeAct(b));
  });
  document.querySelectorAll("img[data-picture]").forEach((img) => {
    if (img.complete) {
      srnodeShowSize(img);
    }
    img.addEventListener("load", () => srnodeShowSize(img));
  });
  const refresh = Number(document.body.dataset.refresh || 0);
  if (refresh > 0) {
    window.setInterval(() => {
      if (document.visibilityState === "visible") {
        window.location.reload();
      }
    }, refresh * 1000);
  }
});
