// Markdown to DOM nodes, safely: every piece of text becomes a text node, elements are made only from
// the fixed tag names below, and links only to http(s) and mailto addresses. Nothing is ever parsed
// as HTML, so whatever the model (or anyone) writes shows as text.
// Covers what chat answers use: paragraphs, line breaks, headings, lists, quotes, code blocks and
// spans, bold, italics, strikethrough, links and bare URLs. An unclosed code block (an answer still
// streaming in) shows as a code block.

const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/,                        // 1, 2: code span
    /\*\*(?=\S)([\s\S]*?\S)\*\*/,                                 // 3: bold
    /__(?=\S)([\s\S]*?\S)__(?!\w)/,                               // 4: bold
    /(?<![\w*])\*(?=[^\s*])([\s\S]*?[^\s*])\*(?![\w*])/,          // 5: italics
    /(?<![\w_])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w_])/,            // 6: italics
    /~~(?=\S)([\s\S]*?\S)~~/,                                     // 7: strikethrough
    /\[([^\]\n]+)\]\(\s*<?([^\s()<>]+)>?\s*\)/,                   // 8, 9: link
    /(https?:\/\/[^\s<>"'`]*[^\s<>"'`.,;:!?)\]}*_~])/,            // 10: bare URL
  ].map((part) => part.source).join("|"),
  "g",
);

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function element(tag, ...children) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}

function link(label, address) {
  let url;
  try {
    url = new URL(address);
  } catch {
    return null;
  }
  if (!SAFE_PROTOCOLS.has(url.protocol)) return null;
  const anchor = element("a", ...label);
  anchor.href = url.href;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer nofollow";
  return anchor;
}

export function inline(text) {
  const nodes = [];
  let at = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > at) nodes.push(text.slice(at, match.index));
    const [whole, , code, bold1, bold2, italic1, italic2, strike, label, address, bare] = match;
    let node;
    if (code !== undefined) node = element("code", code.trim() || code);
    else if (bold1 !== undefined || bold2 !== undefined) node = element("strong", ...inline(bold1 ?? bold2));
    else if (italic1 !== undefined || italic2 !== undefined) node = element("em", ...inline(italic1 ?? italic2));
    else if (strike !== undefined) node = element("del", ...inline(strike));
    else if (label !== undefined) node = link(inline(label), address);
    else node = link([bare], bare);
    nodes.push(node ?? whole);
    at = match.index + whole.length;
  }
  if (at < text.length) nodes.push(text.slice(at));
  return nodes;
}

function withBreaks(lines) {
  const nodes = [];
  lines.forEach((line, index) => {
    if (index) nodes.push(document.createElement("br"));
    nodes.push(...inline(line));
  });
  return nodes;
}

const FENCE = /^\s{0,3}(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;

function list(lines, start, pattern, tag) {
  const node = document.createElement(tag);
  let index = start;
  let item = null;
  for (; index < lines.length; index++) {
    const line = lines[index];
    const match = line.match(pattern);
    if (match) {
      item = [match[match.length - 1]];
      node.append(element("li"));
      if (tag === "ol" && index === start && match[1] !== "1") node.start = Number(match[1]);
    } else if (item && /^\s{2,}\S/.test(line)) {
      item.push(line.trim()); // a continuation line of the item
    } else {
      break;
    }
    node.lastChild.replaceChildren(...withBreaks(item));
  }
  return [node, index];
}

export function renderMarkdown(text) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  const fragment = document.createDocumentFragment();
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) fragment.append(element("p", ...withBreaks(paragraph)));
    paragraph = [];
  };
  for (let index = 0; index < lines.length; ) {
    const line = lines[index];
    let match;
    if ((match = line.match(FENCE))) {
      flush();
      const fence = match[1];
      const body = [];
      index++;
      while (index < lines.length && lines[index].trim() !== fence) body.push(lines[index++]);
      index++; // the closing fence
      const code = element("code", body.join("\n"));
      if (match[2]) code.dataset.language = match[2];
      fragment.append(element("pre", code));
    } else if ((match = line.match(HEADING))) {
      flush();
      fragment.append(element(`h${Math.min(match[1].length + 2, 6)}`, ...inline(match[2])));
      index++;
    } else if (RULE.test(line)) {
      flush();
      fragment.append(document.createElement("hr"));
      index++;
    } else if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (index < lines.length && (match = lines[index].match(QUOTE))) {
        quoted.push(match[1]);
        index++;
      }
      fragment.append(element("blockquote", renderMarkdown(quoted.join("\n"))));
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      flush();
      const [node, next] = BULLET.test(line) ? list(lines, index, BULLET, "ul") : list(lines, index, NUMBERED, "ol");
      fragment.append(node);
      index = next;
    } else if (!line.trim()) {
      flush();
      index++;
    } else {
      paragraph.push(line);
      index++;
    }
  }
  flush();
  return fragment;
}
