// Strict msgpack decoding of structure documents, on top of @msgpack/msgpack's Decoder.
//
// The format needs more than the library's defaults (spec/FORMAT.md, "Structure documents"):
// floats must stay distinguishable from integers (3.0 is not 3), map keys must be strings and
// unique, str must be valid UTF-8, extension types (timestamps included) are refused, and
// nesting and item counts are bounded. The subclass below hooks the decoder's per-value methods
// for that; they are internal to the library, so package-lock.json pins its version and the
// conformance vectors test every rule.

import { DecodeError, Decoder } from "@msgpack/msgpack";

/** A msgpack float (float 32 or float 64), kept apart from integers. */
export class MsgFloat {
  constructor(value) {
    this.value = value;
  }
}

const STRICT_UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

function stringKey(key) {
  if (typeof key !== "string") throw new DecodeError(`map key of type ${key?.constructor?.name ?? typeof key} is not a string`);
  return key;
}

function uniqueKeyMap() {
  // The library assigns map[key] = value; refuse the second assignment of a key.
  return new Proxy(Object.create(null), {
    set(target, key, value) {
      if (Object.prototype.hasOwnProperty.call(target, key)) throw new DecodeError(`duplicate map key ${JSON.stringify(key)}`);
      Object.defineProperty(target, key, { value, enumerable: true, writable: true, configurable: true });
      return true;
    },
  });
}

class StrictDecoder extends Decoder {
  constructor(limits) {
    super({ useBigInt64: true, mapKeyConverter: stringKey });
    this.limits = limits;
    this.items = 0;
  }

  spend(count, depth) {
    // depth + 1: the container's entries sit one level below it.
    if (depth + 1 > this.limits.maxDepth) throw new DecodeError(`nesting deeper than ${this.limits.maxDepth} levels`);
    this.items += count;
    if (this.items > this.limits.maxItems) throw new DecodeError(`more than ${this.limits.maxItems} array elements and map entries`);
  }

  pushMapState(size) {
    this.spend(size, this.stack.length);
    super.pushMapState(size);
    this.stack.top().map = uniqueKeyMap();
  }

  pushArrayState(size) {
    this.spend(size, this.stack.length);
    super.pushArrayState(size);
  }

  readF32() {
    return new MsgFloat(super.readF32());
  }

  readF64() {
    return new MsgFloat(super.readF64());
  }

  decodeUtf8String(byteLength, headerOffset) {
    if (this.bytes.byteLength < this.pos + headerOffset + byteLength) throw new RangeError("Insufficient data");
    const start = this.pos + headerOffset;
    let text;
    try {
      text = STRICT_UTF8.decode(this.bytes.subarray(start, start + byteLength));
    } catch {
      throw new DecodeError("str is not valid UTF-8");
    }
    this.pos += headerOffset + byteLength;
    return text;
  }

  decodeExtension(size, headOffset) {
    const type = this.view.getInt8(this.pos + headOffset);
    throw new DecodeError(`msgpack extension type ${type} is not allowed`);
  }
}

/**
 * Decode exactly one msgpack value. Maps come back as null-prototype objects, arrays as arrays,
 * str as strings, bin as Uint8Array, floats as MsgFloat, integers as numbers (BigInt for int 64
 * and uint 64 encodings). Throws DecodeError or RangeError on malformed input.
 */
export function decodeMsgpack(bytes, { maxDepth = 194, maxItems = Infinity } = {}) {
  return new StrictDecoder({ maxDepth, maxItems }).decode(bytes);
}
