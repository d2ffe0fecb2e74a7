// A Modelfile turned into the JSON body of /api/create, as `mullama create` does.
// The grammar is mullama/store/modelfile.py's (Ollama's): one instruction per
// line, `#` comments, values that are the rest of the line or "quoted" or
// """triple-quoted""" across lines. The daemon checks every value again.

const INSTRUCTIONS = ["from", "parameter", "template", "system", "adapter", "license", "message", "draft", "renderer",
  "parser", "requires"];
const ROLES = ["system", "user", "assistant"];

/** A Modelfile that does not follow the grammar; `line` is 1-based (0: the whole file). */
export class ModelfileError extends Error {
  constructor(line, message) {
    super(line ? `Modelfile line ${line}: ${message}` : `Modelfile: ${message}`);
    this.line = line;
  }
}

function lineEnd(text, pos) {
  const match = /[\r\n]/g;
  match.lastIndex = pos;
  const found = match.exec(text);
  return found ? found.index : text.length;
}

/** The value starting at `pos` and where its last line ends. */
function scanValue(text, pos, line) {
  const end = lineEnd(text, pos);
  const head = text.slice(pos, end).trimStart();
  if (!head.startsWith('"')) return [head.trimEnd(), end];
  const start = end - head.length;
  const triple = text.startsWith('"""', start);
  const quote = triple ? '"""' : '"';
  // A closing quote counts only when nothing but spaces follows it on its line.
  const close = new RegExp(`${quote}(?=[^\\S\\r\\n]*(?:[\\r\\n]|$))`, "g");
  close.lastIndex = start + quote.length;
  const found = close.exec(text);
  if (!found) throw new ModelfileError(line, `unterminated ${triple ? "triple-" : ""}quoted value`);
  return [text.slice(start + quote.length, found.index), lineEnd(text, found.index + quote.length)];
}

function word(text, pos, pattern, line, message) {
  const regex = new RegExp(pattern.source, "y");
  regex.lastIndex = pos;
  const found = regex.exec(text);
  if (!found) throw new ModelfileError(line, message);
  const blank = /[ \t]+/y;
  blank.lastIndex = regex.lastIndex;
  if (!blank.exec(text)) throw new ModelfileError(line, message);
  return [found[0], blank.lastIndex];
}

/** A PARAMETER's text as JSON: numbers and booleans typed, everything else a string. */
function typedParameter(text) {
  if (text === "true" || text === "false") return text === "true";
  if (/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(text)) return Number(text);
  return text;
}

/** Parse `text` into { from, parameters, template, system, adapters, license, messages, ... }. */
export function parse(text) {
  const result = { parameters: {}, license: [], messages: [], adapters: [] };
  let pos = 0;
  let line = 1;
  const source = text.replace(/^\ufeff/, "");
  for (;;) {
    while (pos < source.length && " \t\r\n".includes(source[pos])) {
      if (source[pos] === "\n") line += 1;
      pos += 1;
    }
    if (pos >= source.length) break;
    const start = pos;
    if (source[pos] === "#") {
      pos = lineEnd(source, pos);
      continue;
    }
    const [instructionWord, afterWord] = word(source, pos, /[A-Za-z]+/, line,
      `expected an instruction, got "${source[pos]}"`);
    const instruction = instructionWord.toLowerCase();
    if (!INSTRUCTIONS.includes(instruction)) {
      throw new ModelfileError(line, `unknown instruction "${instructionWord}", expected one of ${INSTRUCTIONS.join(", ").toUpperCase()}`);
    }
    pos = afterWord;
    let value;
    if (instruction === "parameter") {
      const [name, afterName] = word(source, pos, /[A-Za-z0-9_]+/, line, "PARAMETER needs a name and a value");
      [value, pos] = scanValue(source, afterName, line);
      const typed = typedParameter(value);
      if (name === "stop") (result.parameters.stop ||= []).push(value);
      else result.parameters[name] = typed;
    } else if (instruction === "message") {
      const [role, afterRole] = word(source, pos, /[A-Za-z]+/, line, "MESSAGE needs a role and a content");
      if (!ROLES.includes(role)) throw new ModelfileError(line, `message role must be one of ${ROLES.join(", ")}`);
      [value, pos] = scanValue(source, afterRole, line);
      result.messages.push({ role, content: value });
    } else {
      [value, pos] = scanValue(source, pos, line);
      if (instruction === "from") {
        if (result.from !== undefined) throw new ModelfileError(line, "a second FROM (a projector or a file part) needs local files: use `mullama create` for it");
        if (!value.trim()) throw new ModelfileError(line, "FROM needs a model name or a path");
        result.from = value;
      } else if (instruction === "adapter") result.adapters.push(value);
      else if (instruction === "license") result.license.push(value);
      else result[instruction] = value;
    }
    line += (source.slice(start, pos).match(/\r\n|\r|\n/g) || []).length;
  }
  if (result.from === undefined) throw new ModelfileError(0, "no FROM line");
  return result;
}

/**
 * The /api/create body for model `name` from Modelfile `text`. FROM names a
 * model in the store or a GGUF file on the daemon's machine (the browser
 * uploads nothing); ADAPTER needs files the CLI uploads, so it is refused here.
 */
export function createRequest(name, text) {
  const parsed = parse(text);
  if (parsed.adapters.length) throw new ModelfileError(0, "ADAPTER needs local files: use `mullama create` for it");
  if (parsed.draft) throw new ModelfileError(0, "DRAFT needs local files: use `mullama create` for it");
  const body = { model: name, from: parsed.from, stream: true };
  for (const key of ["template", "system", "renderer", "parser", "requires"]) {
    if (parsed[key] !== undefined) body[key] = parsed[key];
  }
  if (Object.keys(parsed.parameters).length) body.parameters = parsed.parameters;
  if (parsed.messages.length) body.messages = parsed.messages;
  if (parsed.license.length) body.license = parsed.license;
  return body;
}
