// Strict JSON (RFC 8259) as the format requires it: UTF-8 only, no duplicate keys, no NaN or
// infinities (1e400 included), no lone surrogates, bounded nesting. JSON.parse cannot do this:
// it keeps the last of duplicate keys and rounds integers beyond 2^53.
//
// Integers (no fraction, no exponent) come back as numbers, or as BigInt beyond 2^53. With
// {typed: true}, other numbers come back as JsonFloat, so 1 and 1.0 stay apart (the manifest and
// safetensors headers need integers, a float there is an error).

export class JsonFloat {
  constructor(value) {
    this.value = value;
  }
}

export class JsonError extends Error {}

const STRICT_UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const ESCAPES = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" };

/** Decode UTF-8 bytes and parse one JSON value; throws JsonError on any deviation. */
export function parseJson(bytes, { typed = false, maxDepth = 64, maxMembers = Infinity } = {}) {
  let text;
  try {
    text = STRICT_UTF8.decode(bytes);
  } catch {
    throw new JsonError("not valid UTF-8");
  }
  let pos = 0;
  let members = 0;

  const fail = (what) => {
    throw new JsonError(`${what} at character ${pos}`);
  };
  const skipSpace = () => {
    while (pos < text.length) {
      const c = text.charCodeAt(pos);
      if (c !== 0x20 && c !== 0x09 && c !== 0x0a && c !== 0x0d) break;
      pos++;
    }
  };
  const spend = () => {
    if (++members > maxMembers) fail(`more than ${maxMembers} object members`);
  };

  const parseString = () => {
    pos++; // opening quote
    let out = "";
    let start = pos;
    for (;;) {
      if (pos >= text.length) fail("unterminated string");
      const c = text.charCodeAt(pos);
      if (c === 0x22) break;
      if (c < 0x20) fail("control character in string");
      if (c === 0x5c) {
        out += text.slice(start, pos);
        const e = text[pos + 1];
        if (e === "u") {
          const hex = text.slice(pos + 2, pos + 6);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail("bad \\u escape");
          out += String.fromCharCode(parseInt(hex, 16));
          pos += 6;
        } else if (e !== undefined && e in ESCAPES) {
          out += ESCAPES[e];
          pos += 2;
        } else {
          fail("bad escape");
        }
        start = pos;
      } else {
        pos++;
      }
    }
    out += text.slice(start, pos);
    pos++; // closing quote
    if (LONE_SURROGATE.test(out)) fail("lone UTF-16 surrogate in string");
    return out;
  };

  const parseNumber = () => {
    NUMBER.lastIndex = pos;
    const m = NUMBER.exec(text);
    if (m === null) fail("invalid value");
    pos = NUMBER.lastIndex;
    const literal = m[0];
    if (m[1] === undefined && m[2] === undefined) {
      const big = BigInt(literal);
      return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
    }
    const value = Number(literal);
    if (!Number.isFinite(value)) fail(`number ${literal.slice(0, 40)} is outside the float64 range`);
    return typed ? new JsonFloat(value) : value;
  };

  const parseValue = (depth) => {
    if (depth > maxDepth) fail(`nesting deeper than ${maxDepth} levels`);
    skipSpace();
    const c = text[pos];
    if (c === "{") {
      pos++;
      const obj = {};
      const seen = new Set();
      skipSpace();
      if (text[pos] === "}") {
        pos++;
        return obj;
      }
      for (;;) {
        skipSpace();
        if (text[pos] !== '"') fail("expected a string key");
        const key = parseString();
        if (seen.has(key)) fail(`duplicate key ${JSON.stringify(key).slice(0, 80)}`);
        seen.add(key);
        skipSpace();
        if (text[pos] !== ":") fail("expected ':'");
        pos++;
        spend();
        Object.defineProperty(obj, key, { value: parseValue(depth + 1), enumerable: true, writable: true, configurable: true });
        skipSpace();
        if (text[pos] === ",") {
          pos++;
          continue;
        }
        if (text[pos] === "}") {
          pos++;
          return obj;
        }
        fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      pos++;
      const arr = [];
      skipSpace();
      if (text[pos] === "]") {
        pos++;
        return arr;
      }
      for (;;) {
        arr.push(parseValue(depth + 1));
        skipSpace();
        if (text[pos] === ",") {
          pos++;
          continue;
        }
        if (text[pos] === "]") {
          pos++;
          return arr;
        }
        fail("expected ',' or ']'");
      }
    }
    if (c === '"') return parseString();
    for (const [word, value] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, pos)) {
        pos += word.length;
        return value;
      }
    }
    return parseNumber();
  };

  const value = parseValue(0);
  skipSpace();
  if (pos !== text.length) fail("extra data after the JSON value");
  return value;
}

/** Typed JSON (JsonFloat, BigInt) as plain JavaScript values (numbers, BigInt kept). */
export function plain(value) {
  if (value instanceof JsonFloat) return value.value;
  if (Array.isArray(value)) return value.map(plain);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      Object.defineProperty(out, k, { value: plain(v), enumerable: true, writable: true, configurable: true });
    }
    return out;
  }
  return value;
}

/** JSON text of a value that may hold BigInt and JsonFloat (floats keep a '.0' or exponent). */
export function stringify(value) {
  if (value === null || typeof value === "boolean" || typeof value === "string") return JSON.stringify(value);
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "number") return JSON.stringify(value);
  if (value instanceof JsonFloat) {
    const text = Object.is(value.value, -0) ? "-0.0" : String(value.value);
    return /[.eE]/.test(text) ? text : `${text}.0`;
  }
  if (Array.isArray(value)) return `[${value.map(stringify).join(",")}]`;
  return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}:${stringify(v)}`).join(",")}}`;
}
