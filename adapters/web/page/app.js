// The chat page: conversations on the side, messages in the middle, the composer at the bottom.
// It talks to the bot's own JSON API (adapters/web/adapter.py); a reply streams in as JSON lines.
import { renderMarkdown } from "/static/markdown.js";

const $ = (id) => document.getElementById(id);
const list = $("conversations");
const messages = $("messages");
const title = $("title");
const text = $("text");
const fileInput = $("file");
const attachmentsShown = $("attachments");
const sendButton = $("send");
const stopButton = $("stop");

let current = null; // the open conversation's id; null for a new one
let pending = []; // images to send with the next message: {file, url}
let replying = 0; // replies streaming into this page
const answering = new Set(); // the conversations those replies belong to, for Stop

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (!response.ok) {
    let problem = `The bot answered ${response.status}.`;
    try {
      problem = (await response.json()).error || problem;
    } catch {
      // not JSON: keep the status line
    }
    throw new Error(problem);
  }
  return response;
}

function element(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);
  return node;
}

// -- the list of conversations -------------------------------------------------------------

async function refreshList() {
  const { conversations } = await (await api("/api/conversations")).json();
  list.replaceChildren(
    ...conversations.map(({ id, title: name }) => {
      const button = element("button", "", name);
      button.type = "button";
      button.addEventListener("click", () => open(id));
      const item = element("li", "", button);
      item.dataset.id = id;
      return item;
    }),
  );
  markCurrent();
}

function markCurrent() {
  for (const item of list.children) {
    item.classList.toggle("current", item.dataset.id === current);
    if (item.dataset.id === current) title.textContent = item.textContent;
  }
}

// -- showing messages ----------------------------------------------------------------------

// An image the bot refused, or the browser can't show: its name and why, never a broken-image icon.
function refusedImage(name, reason) {
  const figure = element("figure", "refused", element("strong", "", name));
  if (reason) figure.append(element("span", "", reason));
  figure.title = name;
  return figure;
}

function imageStrip(images) {
  return element("div", "images", ...images.map(({ src, name }) => {
    const image = element("img");
    image.src = src;
    image.alt = name;
    image.title = name;
    image.addEventListener("error", () => image.replaceWith(refusedImage(name, "")), { once: true });
    return image;
  }));
}

// The images of a question that the answer's notes refuse (a refusal names its file).
function markRefused(question, notes) {
  for (const shown of question.querySelectorAll(".images > *")) {
    const reason = notes.find((note) => note.includes(shown.title));
    if (reason) shown.replaceWith(refusedImage(shown.title, reason));
  }
}

function showQuestion(words, images) {
  $("hello")?.remove();
  const bubble = element("article", "message user");
  if (images.length) bubble.append(imageStrip(images));
  if (words) bubble.append(element("p", "plain", words));
  messages.append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

class Answer {
  constructor() {
    this.text = "";
    this.node = element("article", "message assistant");
    this.body = element("div", "body");
    this.status = element("p", "status");
    this.node.append(this.body, this.status);
    messages.append(this.node);
  }

  setStatus(words) {
    this.status.textContent = words;
  }

  setText(words) {
    this.text = words;
    this.body.replaceChildren(renderMarkdown(words));
    this.node.scrollIntoView({ block: "end" });
  }

  finish(words, notes) {
    this.node.classList.add("done");
    this.setStatus("");
    this.setText(words);
    // Notes (refusals, limits, what happened) read as they do on the other platforms: in italics.
    for (const note of notes) this.body.append(element("p", "note", element("em", "", note)));
    if (this.question) markRefused(this.question, notes);
  }
}

function showTurns(turns) {
  messages.replaceChildren();
  for (const turn of turns) {
    const images = turn.images.map(({ digest, name }) => ({ src: `/api/conversations/${current}/images/${digest}`, name }));
    if (turn.role === "user") showQuestion(turn.text, images);
    else new Answer().finish(turn.text, []);
  }
}

async function open(id) {
  current = id;
  location.hash = id;
  markCurrent();
  const conversation = await (await api(`/api/conversations/${id}`)).json();
  title.textContent = conversation.title;
  showTurns(conversation.turns);
  if (conversation.busy) new Answer().setStatus("An answer is still being written here; open this conversation again in a moment to see it.");
}

function startNew() {
  current = null;
  history.replaceState(null, "", location.pathname);
  title.textContent = "New conversation";
  const hello = element("p", "hello", "Ask IDEFICS about an image: attach, drop or paste one (or a link to one), then ask your question.");
  hello.id = "hello";
  messages.replaceChildren(hello);
  markCurrent();
  text.focus();
}

// -- the composer --------------------------------------------------------------------------

function addImages(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/") && file.type) continue;
    pending.push({ file, url: URL.createObjectURL(file) });
  }
  showPending();
}

function showPending() {
  attachmentsShown.replaceChildren(
    ...pending.map((image, index) => {
      const thumbnail = element("img");
      thumbnail.src = image.url;
      thumbnail.alt = image.file.name;
      const remove = element("button", "remove", "×");
      remove.type = "button";
      remove.title = `Remove ${image.file.name}`;
      remove.addEventListener("click", () => {
        pending.splice(index, 1);
        showPending();
      });
      return element("li", "", thumbnail, remove);
    }),
  );
}

function setReplying(change) {
  replying += change;
  stopButton.hidden = replying === 0;
}

async function send() {
  const words = text.value.trim();
  if (!words && !pending.length) return;
  const form = new FormData();
  form.append("text", words);
  for (const { file } of pending) form.append("image", file, file.name);
  const question = showQuestion(words, pending.map(({ url, file }) => ({ src: url, name: file.name })));
  text.value = "";
  pending = [];
  showPending();
  const answer = new Answer();
  answer.question = question;
  answer.setStatus("Sending…");
  setReplying(+1);
  try {
    const response = await api(`/api/conversations/${current ?? "new"}/messages`, { method: "POST", body: form });
    await follow(response, answer);
  } catch (error) {
    answer.finish(answer.text, [error.message]);
  } finally {
    answering.delete(answer.conversation);
    setReplying(-1);
  }
  await refreshList();
}

async function follow(response, answer) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines) {
      if (line) apply(JSON.parse(line), answer);
    }
  }
  if (!answer.node.classList.contains("done")) answer.finish(answer.text, ["The connection to the bot was lost; reload the page to see the answer."]);
}

function apply(update, answer) {
  if (update.type === "conversation") {
    answer.conversation = update.id;
    answering.add(update.id);
    if (current !== update.id) {
      current = update.id;
      location.hash = update.id;
    }
  } else if (update.type === "status") {
    answer.setStatus(update.text);
  } else if (update.type === "delta") {
    answer.setStatus("");
    answer.setText(answer.text + update.text);
  } else if (update.type === "text") {
    answer.setStatus("");
    answer.setText(update.text);
  } else if (update.type === "final") {
    answer.finish(update.text, update.notes);
    if (update.stopped) answer.node.classList.add("stopped");
  }
}

async function stop() {
  await Promise.all([...answering].map((id) => api(`/api/conversations/${id}/stop`, { method: "POST" })));
}

async function reset() {
  if (current) {
    await api(`/api/conversations/${current}/reset`, { method: "POST" });
    startNew();
    await refreshList();
  }
}

// -- wiring --------------------------------------------------------------------------------

function reporting(action) {
  return (...args) => action(...args).catch((error) => new Answer().finish("", [error.message]));
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  reporting(send)();
});
text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    reporting(send)();
  }
});
fileInput.addEventListener("change", () => {
  addImages(fileInput.files);
  fileInput.value = "";
});
text.addEventListener("paste", (event) => {
  const files = [...event.clipboardData.files];
  if (files.length) {
    event.preventDefault();
    addImages(files);
  }
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  if (event.dataTransfer.files.length) {
    addImages(event.dataTransfer.files);
  } else {
    // An image dragged from another page arrives as its address: the bot fetches links to images.
    const address = event.dataTransfer.getData("text/uri-list").split("\n").find((line) => line && !line.startsWith("#"));
    if (address) text.value = `${text.value}${text.value ? " " : ""}${address}`;
  }
  text.focus();
});
stopButton.addEventListener("click", reporting(stop));
$("reset").addEventListener("click", reporting(reset));
$("new-conversation").addEventListener("click", startNew);
window.addEventListener("hashchange", () => {
  const wanted = location.hash.slice(1);
  if (/^[0-9a-f]{16}$/.test(wanted) && wanted !== current) reporting(open)(wanted);
});

reporting(async () => {
  await refreshList();
  const wanted = location.hash.slice(1);
  if (/^[0-9a-f]{16}$/.test(wanted)) await open(wanted).catch(startNew); // reset meanwhile, or not this session's
  document.body.dataset.ready = "true";
})();
