// Sign-in, navigation between pages (#/batches, #/batch/<id>, #/models, #/usage/<range>) and
// their polling.

import { ApiError, checkKey, session } from "/ui/api.js";
import { showBatch } from "/ui/batch.js";
import { showBatches } from "/ui/batches.js";
import { fill } from "/ui/dom.js";
import { showModels } from "/ui/models.js";
import { showUsage } from "/ui/usage.js";

const $ = (id) => document.getElementById(id);

let timers = [];
let generation = 0;

/** What a page gets: `every(ms, fn)` runs fn now and then every ms until the page changes. */
function pageContext() {
  const mine = ++generation;
  return {
    live: () => mine === generation,
    every(ms, fn) {
      const run = async () => {
        if (mine !== generation) return;
        try {
          await fn();
        } catch (error) {
          if (error instanceof ApiError && error.status === 401) return signOut(error.message);
          console.error(error);
        }
        if (mine === generation) timers.push(setTimeout(run, ms));
      };
      run();
    },
  };
}

function stopPolling() {
  timers.forEach(clearTimeout);
  timers = [];
  generation++;
}

function signOut(message = "") {
  session.key = null;
  stopPolling();
  route();
  $("sign-in-error").textContent = message;
}

function route() {
  stopPolling();
  const signedIn = Boolean(session.key);
  $("sign-in").hidden = signedIn;
  $("nav").hidden = !signedIn;
  const page = $("page");
  if (!signedIn) {
    fill(page);
    $("api-key").focus();
    return;
  }
  const [, name = "batches", arg] = location.hash.split("/");
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.page === (name === "batch" ? "batches" : name));
  }
  const ctx = pageContext();
  if (name === "batch" && arg) showBatch(page, decodeURIComponent(arg), ctx);
  else if (name === "models") showModels(page, ctx);
  else if (name === "usage") showUsage(page, arg, ctx);
  else showBatches(page, ctx);
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  const error = $("sign-in-error");
  error.textContent = "";
  try {
    await checkKey(key);
  } catch (e) {
    error.textContent = e.message;
    return;
  }
  session.key = key;
  $("api-key").value = "";
  if (!location.hash) location.hash = "#/batches";
  route();
});

$("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
route();

