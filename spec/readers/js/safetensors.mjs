// The safetensors container, parsed strictly (spec/FORMAT.md, "Tensor archives").

import { JsonError, JsonFloat, parseJson } from "./json.mjs";

/** Element size in bytes and the typed array that views it (raw bits where JS has no type). */
export const DTYPES = {
  F64: [8, Float64Array], F32: [4, Float32Array], F16: [2, Uint16Array], BF16: [2, Uint16Array],
  F8_E4M3: [1, Uint8Array], F8_E5M2: [1, Uint8Array], C64: [8, Float32Array],
  I64: [8, BigInt64Array], I32: [4, Int32Array], I16: [2, Int16Array], I8: [1, Int8Array],
  U64: [8, BigUint64Array], U32: [4, Uint32Array], U16: [2, Uint16Array], U8: [1, Uint8Array],
  BOOL: [1, Uint8Array],
};

export const METADATA_KEY = "__metadata__";
const TWO_63 = 2n ** 63n;

/** One tensor of an archive; `bytes` is its raw little-endian data. */
export class Tensor {
  constructor(name, dtype, shape, bytes) {
    this.name = name;
    this.dtype = dtype;
    this.shape = shape;
    this.bytes = bytes;
  }

  /**
   * The elements as a typed array: Float32Array for F32, BigInt64Array for I64, and so on;
   * C64 as interleaved (real, imaginary) Float32Array; F16, BF16 and F8 as their raw bits
   * (Uint16Array / Uint8Array). Copies only when the data is not aligned to the element size.
   */
  get data() {
    const [size, ArrayType] = DTYPES[this.dtype];
    let bytes = this.bytes;
    if (bytes.byteOffset % size !== 0) bytes = bytes.slice();
    const count = bytes.byteLength / ArrayType.BYTES_PER_ELEMENT;
    return new ArrayType(bytes.buffer, bytes.byteOffset, count);
  }
}

function isSize(value) {
  // A non-negative integer below 2^63; JSON integers arrive as number or BigInt.
  if (typeof value === "number") return Number.isInteger(value) && value >= 0;
  return typeof value === "bigint" && value >= 0n && value < TWO_63;
}

/**
 * Validate an archive (a Uint8Array holding the whole file) and return its tensors in data
 * order plus its metadata. `fail(what)` must throw.
 */
export function parseArchive(blob, { limits, fail }) {
  const total = blob.byteLength;
  if (total < 8) fail(`file is ${total} bytes, shorter than the 8-byte header length`);
  const view = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  const n = view.getBigUint64(0, true);
  if (n > BigInt(limits.MAX_SAFETENSORS_HEADER_BYTES)) fail(`header length ${n} exceeds ${limits.MAX_SAFETENSORS_HEADER_BYTES} bytes`);
  if (8n + n > BigInt(total)) fail(`header length ${n} runs past the end of the ${total}-byte file`);
  const start = 8 + Number(n);
  let header;
  try {
    header = parseJson(blob.subarray(8, start), { typed: true, maxDepth: limits.MAX_NESTING_DEPTH });
  } catch (error) {
    if (error instanceof JsonError) fail(`header is not valid JSON (${error.message})`);
    throw error;
  }
  if (header === null || typeof header !== "object" || Array.isArray(header)) fail("header is not a JSON object");
  let metadata = {};
  if (Object.prototype.hasOwnProperty.call(header, METADATA_KEY)) {
    metadata = header[METADATA_KEY];
    delete header[METADATA_KEY];
    if (metadata === null || typeof metadata !== "object" || Array.isArray(metadata)
        || !Object.values(metadata).every((v) => typeof v === "string")) {
      fail("__metadata__ must map strings to strings");
    }
  }
  const names = Object.keys(header);
  if (names.length > limits.MAX_TENSORS_PER_FILE) fail(`${names.length} tensors exceed the limit of ${limits.MAX_TENSORS_PER_FILE}`);
  const infos = [];
  for (const name of names) {
    const entry = header[name];
    const keys = entry !== null && typeof entry === "object" && !Array.isArray(entry) ? Object.keys(entry).sort() : [];
    if (keys.join(",") !== "data_offsets,dtype,shape") fail(`entry ${JSON.stringify(name)} must have exactly dtype, shape and data_offsets`);
    const { dtype, shape, data_offsets: offsets } = entry;
    if (typeof dtype !== "string" || !Object.prototype.hasOwnProperty.call(DTYPES, dtype)) {
      fail(`tensor ${JSON.stringify(name)} has unsupported dtype ${JSON.stringify(dtype instanceof JsonFloat ? dtype.value : dtype)}`);
    }
    if (!Array.isArray(shape) || shape.length > limits.MAX_TENSOR_NDIM || !shape.every(isSize)) {
      fail(`tensor ${JSON.stringify(name)} has an invalid shape`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isSize)) {
      fail(`tensor ${JSON.stringify(name)} has invalid data_offsets`);
    }
    if (shape.reduce((a, d) => a * (BigInt(d) > 1n ? BigInt(d) : 1n), 1n) * BigInt(DTYPES[dtype][0]) >= TWO_63) {
      fail(`tensor ${JSON.stringify(name)} has a shape too large for 64-bit strides`); // even when empty
    }
    const [begin, end] = offsets.map(BigInt);
    const needed = shape.reduce((a, d) => a * BigInt(d), 1n) * BigInt(DTYPES[dtype][0]);
    if (end - begin !== needed) {
      fail(`tensor ${JSON.stringify(name)} spans ${end - begin} bytes but its shape and dtype need ${needed}`);
    }
    infos.push({ name, dtype, shape: shape.map(Number), begin: BigInt(start) + begin, end: BigInt(start) + end });
  }
  infos.sort((a, b) => (a.begin < b.begin ? -1 : a.begin > b.begin ? 1 : a.end < b.end ? -1 : a.end > b.end ? 1 : 0));
  let position = BigInt(start);
  for (const info of infos) {
    if (info.begin !== position) fail(`tensor ${JSON.stringify(info.name)} does not start where the previous one ends`);
    position = info.end;
  }
  if (position !== BigInt(total)) fail(`tensor data ends at byte ${position} but the file has ${total} bytes`);
  for (const info of infos) {
    if (info.dtype !== "BOOL") continue;
    const data = blob.subarray(Number(info.begin), Number(info.end));
    if (data.some((b) => b > 1)) fail(`bool tensor ${JSON.stringify(info.name)} holds bytes other than 0 and 1`);
  }
  const tensors = infos.map((i) => new Tensor(i.name, i.dtype, i.shape, blob.subarray(Number(i.begin), Number(i.end))));
  return { tensors, metadata };
}
