// weir plugin SDK for JavaScript: the same shape as the Rust SDK (`weir-sdk`) and the Python
// one (`weir_plugin.py`).
//
// A plugin module default-exports a consumer: a function called once per record with a context.
//
//     import { consumer } from "./weir-plugin.js";
//
//     export default consumer((record, ctx) => {
//       const paid = record.json();
//       const balance = (ctx.get(`balance/${paid.user}`) ?? 0) + paid.amount;
//       ctx.put(`balance/${paid.user}`, balance);
//       ctx.emitJson("points.credited", paid.user, { user: paid.user, balance });
//     });
//
// Batches arrive and outputs leave as one blob each in the weir batch encoding
// (docs/batch-encoding.md); this module decodes and encodes it, so the plugin only sees
// records. State values are JSON (`get`/`put`) or bytes (`getBytes`/`putBytes`), each with a
// version for `compareAndSet`. A throw fails the batch; its message, prefixed with the record's
// offset, reaches the operator and the dead-letter topic, as in Rust.
//
// Plugin logic is tested natively with `MemoryState` under `node --test` (no wasm, no server):
//
//     const state = new MemoryState();
//     const outputs = run(plugin, [new Record({ value: '{"user":"a","amount":3}' })], state);
//
// Inside a component, `componentExports` (used by the entry module `weir plugin build`
// generates) wires the consumer to the `weir:plugin/consumer` world's imports and exports.

// UTF-8 by hand: QuickJS, which the components run on, has no TextEncoder/TextDecoder, and
// native tests should run the code the component runs.
const utf8 = {
  encode(text) {
    // ASCII (keys, JSON of plain data) straight into the array: QuickJS is an interpreter.
    const ascii = new Uint8Array(text.length);
    let i = 0;
    for (; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c >= 0x80) break;
      ascii[i] = c;
    }
    if (i === text.length) return ascii;
    const out = Array.from(ascii.subarray(0, i));
    text = text.slice(i);
    for (const ch of text) {
      const c = ch.codePointAt(0);
      if (c < 0x80) out.push(c);
      else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
      else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
      else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    }
    return Uint8Array.from(out);
  },
};

const utf8Decoder = {
  /** Strict: invalid UTF-8 throws, as Rust's `str::from_utf8` refuses it. */
  decode(bytes) {
    let ascii = 0;
    while (ascii < bytes.length && bytes[ascii] < 0x80) ascii++;
    let text = "";
    for (let at = 0; at < ascii; at += 4096) {
      text += String.fromCharCode.apply(null, bytes.subarray(at, Math.min(ascii, at + 4096)));
    }
    for (let i = ascii; i < bytes.length; ) {
      const b = bytes[i];
      const n = b < 0x80 ? 0 : b >= 0xc2 && b < 0xe0 ? 1 : b >= 0xe0 && b < 0xf0 ? 2 : b >= 0xf0 && b < 0xf5 ? 3 : -1;
      if (n < 0) throw new PluginError(`invalid UTF-8 at byte ${i}`);
      let c = n === 0 ? b : b & (0x3f >> n);
      for (let k = 1; k <= n; k++) {
        const cont = bytes[i + k];
        if (cont === undefined || (cont & 0xc0) !== 0x80) throw new PluginError(`invalid UTF-8 at byte ${i}`);
        c = (c << 6) | (cont & 63);
      }
      const min = [0, 0x80, 0x800, 0x10000][n];
      if (c < min || c > 0x10ffff || (c >= 0xd800 && c < 0xe000)) throw new PluginError(`invalid UTF-8 at byte ${i}`);
      text += String.fromCodePoint(c);
      i += n + 1;
    }
    return text;
  },
};

/** Fails the batch with a message for the operator. */
export class PluginError extends Error {
  constructor(message) {
    super(message);
    this.name = "PluginError";
  }
}

function toBytes(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === "string") return utf8.encode(v);
  if (v instanceof Uint8Array) return v;
  throw new PluginError(`expected a string or Uint8Array, got ${typeof v}`);
}

// Compact and insertion-ordered: for plain data (strings, integers below 2^53, objects) the
// bytes serde_json writes for the same fields.
function jsonBytes(value) {
  return utf8.encode(JSON.stringify(value));
}

function parseJson(bytes, what) {
  try {
    return JSON.parse(utf8Decoder.decode(bytes));
  } catch (e) {
    throw new PluginError(`${what} is not the expected JSON: ${e.message}`);
  }
}

/** One input record. */
export class Record {
  constructor({ value = new Uint8Array(), key = null, offset = 0, timestampMs = 0, partition = 0, id = null, headers = [] } = {}) {
    this.offset = offset;
    this.timestampMs = timestampMs;
    this.partition = partition;
    this.key = toBytes(key);
    this.value = toBytes(value);
    this.id = id;
    this.headers = headers.map(([name, v]) => [name, toBytes(v)]);
  }

  /** The value parsed as JSON. */
  json() {
    return parseJson(this.value, "value");
  }

  /** The value as UTF-8 text. */
  text() {
    return utf8Decoder.decode(this.value);
  }

  /** The key as UTF-8 text, or null. */
  keyStr() {
    return this.key === null ? null : utf8Decoder.decode(this.key);
  }

  /** The first header value with this name, or null. */
  header(name) {
    const found = this.headers.find(([n]) => n === name);
    return found ? found[1] : null;
  }
}

/** One record the plugin emits. */
export class Output {
  constructor(topic, key, value, headers = []) {
    this.topic = topic;
    this.key = key;
    this.value = value;
    this.headers = headers;
  }

  json() {
    return parseJson(this.value, "output");
  }
}

// Map keys: one char per byte.
const latin1 = (bytes) => String.fromCharCode.apply(null, bytes);
const unlatin1 = (text) => Uint8Array.from(text, (c) => c.charCodeAt(0));

/** State for native tests: key → { value, version }. */
export class MemoryState {
  constructor() {
    this.entries = new Map();
    this.logs = [];
  }

  get(key) {
    return this.entries.get(latin1(key)) ?? null;
  }

  put(key, value) {
    const version = this.get(key)?.version ?? 0;
    this.entries.set(latin1(key), { value, version: version + 1 });
  }

  delete(key) {
    this.entries.delete(latin1(key));
  }

  compareAndSet(key, expected, value) {
    const version = this.get(key)?.version ?? 0;
    if (version !== expected) return null;
    this.entries.set(latin1(key), { value, version: version + 1 });
    return version + 1;
  }

  log(level, message) {
    this.logs.push([level, message]);
  }

  /** The JSON value of a key, or null (for assertions). */
  getJson(key) {
    const entry = this.get(toBytes(key));
    return entry === null ? null : parseJson(entry.value, `state ${key}`);
  }

  /** Keys as text (for assertions). */
  keys() {
    return [...this.entries.keys()].map((k) => utf8Decoder.decode(unlatin1(k)));
  }
}

/** What a plugin may do while processing a record: state, config, emit, log. */
export class Context {
  constructor(state, config = {}) {
    this.state = state;
    this.config = config instanceof Map ? Object.fromEntries(config) : { ...config };
    this.outputs = [];
  }

  /** A config value converted to the default's type, or the default. */
  configOr(name, fallback) {
    const raw = this.config[name];
    if (raw === undefined) return fallback;
    if (typeof fallback === "number") {
      const n = raw.trim() === "" ? NaN : Number(raw);
      if (Number.isNaN(n)) throw new PluginError(`config ${name}=${JSON.stringify(raw)} is not a number`);
      return n;
    }
    if (typeof fallback === "boolean") {
      if (raw !== "true" && raw !== "false") throw new PluginError(`config ${name}=${JSON.stringify(raw)} is not true or false`);
      return raw === "true";
    }
    return raw;
  }

  /** { value: Uint8Array, version } or null. */
  getVersioned(key) {
    return this.state.get(toBytes(key));
  }

  getBytes(key) {
    return this.getVersioned(key)?.value ?? null;
  }

  /** The JSON value of a key, or null. */
  get(key) {
    const raw = this.getBytes(key);
    return raw === null ? null : parseJson(raw, `state ${key}`);
  }

  putBytes(key, value) {
    this.state.put(toBytes(key), toBytes(value));
  }

  /** Stores a JSON value. */
  put(key, value) {
    this.state.put(toBytes(key), jsonBytes(value));
  }

  delete(key) {
    this.state.delete(toBytes(key));
  }

  /** Writes the JSON value if the key's version is `expectedVersion` (0 = absent); the new
   * version, or null when it did not match. */
  compareAndSet(key, expectedVersion, value) {
    return this.state.compareAndSet(toBytes(key), expectedVersion, jsonBytes(value));
  }

  /** Emits a record to one of the plugin's output topics. */
  emit(topic, key, value, headers = []) {
    this.outputs.push(new Output(topic, toBytes(key), toBytes(value), headers.map(([n, v]) => [n, toBytes(v)])));
  }

  emitJson(topic, key, value) {
    this.emit(topic, key, jsonBytes(value));
  }

  /** A line in `weir plugin logs`; level is debug, info, warn or error. */
  log(message, level = "info") {
    this.state.log(level, String(message));
  }
}

// --- the batch encoding (docs/batch-encoding.md) -------------------------------------------

/** The records of an input batch blob. */
export function decodeBatch(blob) {
  // One function with local reads: method calls and DataView are slow in QuickJS.
  const b = blob;
  const end = b.length;
  let i = 0;
  const need = (n) => {
    if (i + n > end) throw new PluginError("batch blob truncated");
  };
  const u16 = () => { need(2); const v = b[i] | (b[i + 1] << 8); i += 2; return v; };
  const u32 = () => { need(4); const v = (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16)) + b[i + 3] * 16777216; i += 4; return v; };
  const bytes = (n) => { need(n); const v = b.subarray(i, i + n); i += n; return v; };
  const records = [];
  for (let count = u32(); count > 0; count--) {
    // u64 / i64 as two 32-bit halves, not BigInt: exact below 2^53.
    const offset = u32() + u32() * 4294967296;
    const lo = u32();
    const hi = u32();
    const timestampMs = lo + (hi | 0) * 4294967296;
    const partition = u32();
    need(1);
    const flags = b[i++];
    const key = flags & 1 ? bytes(u32()) : null;
    const value = bytes(u32());
    const id = flags & 2 ? utf8Decoder.decode(bytes(u16())) : null;
    const headers = [];
    for (let h = u16(); h > 0; h--) {
      const name = utf8Decoder.decode(bytes(u16()));
      headers.push([name, bytes(u32())]);
    }
    const record = Object.create(Record.prototype);
    record.offset = offset;
    record.timestampMs = timestampMs;
    record.partition = partition;
    record.key = key;
    record.value = value;
    record.id = id;
    record.headers = headers;
    records.push(record);
  }
  if (i !== end) throw new PluginError("batch blob has trailing bytes");
  return records;
}

/** The outputs blob of a list of `Output`. */
export function encodeOutputs(outputs) {
  let size = 4;
  const topics = outputs.map((o) => utf8.encode(o.topic));
  const names = outputs.map((o) => o.headers.map(([n]) => utf8.encode(n)));
  outputs.forEach((o, i) => {
    size += 2 + topics[i].length + 1 + (o.key === null ? 0 : 4 + o.key.length) + 4 + o.value.length + 2;
    o.headers.forEach(([, v], h) => { size += 2 + names[i][h].length + 4 + v.length; });
  });
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  let at = 0;
  const u8 = (v) => { view.setUint8(at, v); at += 1; };
  const u16 = (v) => { if (v > 0xffff) throw new PluginError("a topic or header name is longer than 65535 bytes"); view.setUint16(at, v, true); at += 2; };
  const u32 = (v) => { view.setUint32(at, v, true); at += 4; };
  const bytes = (b) => { out.set(b, at); at += b.length; };
  u32(outputs.length);
  outputs.forEach((o, i) => {
    u16(topics[i].length); bytes(topics[i]);
    u8(o.key === null ? 0 : 1);
    if (o.key !== null) { u32(o.key.length); bytes(o.key); }
    u32(o.value.length); bytes(o.value);
    u16(o.headers.length);
    o.headers.forEach(([, v], h) => { u16(names[i][h].length); bytes(names[i][h]); u32(v.length); bytes(v); });
  });
  return out;
}

// --- wiring --------------------------------------------------------------------------------

/** Marks the plugin's per-record function: `export default consumer((record, ctx) => ...)`. */
export function consumer(fn) {
  if (typeof fn !== "function") throw new PluginError("consumer() takes a function (record, ctx) => void");
  fn.weirConsumer = true;
  return fn;
}

/** Runs a consumer over records natively (tests); returns the outputs. */
export function run(fn, records, state, config = {}) {
  const ctx = new Context(state, config);
  for (const record of records) fn(record, ctx);
  return ctx.outputs;
}

function errorText(e) {
  if (e instanceof Error) return `${e.name}: ${e.message}`;
  return String(e);
}

/** The world's exports for a consumer, given the `weir:plugin/state` and `log` imports. */
export function componentExports(fn, hostState, hostLog) {
  if (typeof fn !== "function" || !fn.weirConsumer) {
    throw new PluginError("the plugin module must `export default consumer((record, ctx) => ...)`");
  }
  const state = {
    get(key) {
      const v = hostState.get(key);
      return v === undefined || v === null ? null : { value: v.value, version: Number(v.version) };
    },
    put: (key, value) => hostState.put(key, value),
    delete: (key) => hostState.delete(key),
    compareAndSet(key, expected, value) {
      const v = hostState.compareAndSet(key, BigInt(expected), value);
      return v === undefined || v === null ? null : Number(v);
    },
    log: (level, message) => hostLog.write(level, message),
  };
  let config = {};
  return {
    configure(pairs) {
      config = Object.fromEntries(pairs);
    },
    process(batch) {
      const ctx = new Context(state, config);
      for (const record of decodeBatch(batch)) {
        try {
          fn(record, ctx);
        } catch (e) {
          throw `offset=${record.offset}: ${errorText(e)}`;
        }
      }
      return encodeOutputs(ctx.outputs);
    },
  };
}
