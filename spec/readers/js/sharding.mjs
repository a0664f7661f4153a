// Format 1.2, the sharded layout (spec/FORMAT.md §18): sharding.json parsed strictly and checked
// against the shards. This reader verifies a sharded checkpoint (every file's size and SHA-256,
// as for any checkpoint) and lists its tensors; it does not assemble them into full arrays.

import { CheckpointCorruptedError, UnsupportedFormatError } from "./errors.mjs";

export const SHARDING_NAME = "sharding.json";
export const MAX_SHARDING_BYTES = 256 * 1024 * 1024;
export const MAX_CHUNKS_PER_TENSOR = 65536;
const FILE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
const KEYS = ["format", "paths", "tensors", "values", "version", "world_size"];

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Uint8Array);
const count = (v) => (typeof v === "bigint" ? v : BigInt(v));
const isIndex = (v) => (typeof v === "number" && Number.isInteger(v) && v >= 0) || (typeof v === "bigint" && v >= 0n && v < 2n ** 63n);
const product = (list) => list.reduce((a, b) => a * count(b), 1n);

/**
 * Validate a parsed sharding.json against the manifest's file names and the parsed shard
 * archives (Map file -> Map(name -> Tensor)); returns [{key, dtype, shape, chunks}].
 */
export function checkSharding(doc, { source, listed, shards }) {
  const fail = (what) => {
    throw new CheckpointCorruptedError(`${source}: invalid sharding document: ${what}; the checkpoint is damaged`);
  };
  if (!isObject(doc) || Object.keys(doc).sort().join() !== KEYS.join()) fail(`expected an object with exactly the keys ${KEYS}`);
  if (doc.format !== "safeckpt-sharding") fail("'format' must be \"safeckpt-sharding\"");
  if (count(doc.version) !== 1n) throw new UnsupportedFormatError(`${source}: sharding version ${doc.version} is not supported`);
  if (!isIndex(doc.world_size) || count(doc.world_size) < 1n || count(doc.world_size) > 2n ** 31n) fail("'world_size' must be a positive integer");
  for (const name of ["tensors", "values", "paths"]) if (!isObject(doc[name])) fail(`'${name}' must be an object`);
  const file = (name, suffix, where) => {
    if (typeof name !== "string" || !name.endsWith(suffix) || !FILE_NAME.test(name)) fail(`${where}: 'file' must name a ${suffix} file in the folder`);
    if (!listed.has(name)) fail(`${where}: file ${JSON.stringify(name)} is not listed in manifest.json`);
    return name;
  };
  const listing = [];
  const stored = []; // checked after every structural rule, as the Python reader does
  for (const [key, entry] of Object.entries(doc.tensors)) {
    const where = `tensor ${JSON.stringify(key)}`;
    if (!isObject(entry) || Object.keys(entry).sort().join() !== "chunks,dtype,shape") fail(`${where} must have exactly dtype, shape and chunks`);
    const { dtype, shape, chunks } = entry;
    if (!Array.isArray(shape) || shape.length > 64 || !shape.every(isIndex)) fail(`${where} has an invalid shape`);
    if (!Array.isArray(chunks) || chunks.length < 1 || chunks.length > MAX_CHUNKS_PER_TENSOR) fail(`${where}: 'chunks' must hold 1 to ${MAX_CHUNKS_PER_TENSOR} chunks`);
    let volume = 0n;
    const boxes = [];
    chunks.forEach((chunk, number) => {
      const at = `${where}, chunk ${number}`;
      if (!isObject(chunk) || Object.keys(chunk).sort().join() !== "file,name,offsets,sizes") fail(`${at} must have exactly offsets, sizes, file and name`);
      const { offsets, sizes } = chunk;
      for (const list of [offsets, sizes]) if (!Array.isArray(list) || list.length !== shape.length || !list.every(isIndex)) fail(`${at}: offsets and sizes need one non-negative integer per dimension`);
      if (offsets.some((o, i) => count(o) + count(sizes[i]) > count(shape[i]))) fail(`${at}: box lies outside the tensor's shape`);
      const name = file(chunk.file, ".safetensors", at);
      stored.push(() => {
        const tensor = shards.get(name)?.get(chunk.name);
        if (tensor === undefined || tensor.dtype !== dtype || tensor.shape.length !== sizes.length || tensor.shape.some((d, i) => count(d) !== count(sizes[i]))) {
          fail(`${at}: ${name} has no ${dtype} tensor ${JSON.stringify(chunk.name)} of shape [${sizes}]`);
        }
      });
      volume += product(sizes);
      if (product(sizes) > 0n) boxes.push([offsets.map(count), sizes.map(count)]);
    });
    if (volume !== product(shape)) fail(`${where}: its chunks hold ${volume} elements, the tensor has ${product(shape)}`);
    boxes.sort((a, b) => (a[0][0] < b[0][0] ? -1 : a[0][0] > b[0][0] ? 1 : 0));
    let active = [];
    for (const [offsets, sizes] of boxes) {
      if (offsets.length) active = active.filter(([o, s]) => o[0] + s[0] > offsets[0]);
      for (const [o, s] of active) {
        if (offsets.every((x, i) => x < o[i] + s[i] && o[i] < x + sizes[i])) fail(`${where}: chunks overlap`);
      }
      active.push([offsets, sizes]);
    }
    listing.push({ key, dtype, shape: shape.map((d) => Number(d)), chunks: chunks.length });
  }
  for (const [key, entry] of Object.entries(doc.values)) {
    if (key in doc.tensors) fail(`${JSON.stringify(key)} is both a tensor and a value`);
    if (!isObject(entry) || Object.keys(entry).join() !== "file") fail(`value ${JSON.stringify(key)} must have exactly 'file'`);
    file(entry.file, ".msgpack", `value ${JSON.stringify(key)}`);
  }
  const keys = new Set([...Object.keys(doc.tensors), ...Object.keys(doc.values)]);
  if (Object.keys(doc.paths).length !== keys.size) fail("'paths' must list exactly the tensors and values");
  for (const [key, pathItems] of Object.entries(doc.paths)) {
    if (!keys.has(key) || !Array.isArray(pathItems) || pathItems.length < 1 || pathItems.length > 64
        || !pathItems.every((p) => typeof p === "string" || isIndex(p)) || pathItems.map(String).join(".") !== key) {
      fail(`path of ${JSON.stringify(key)} must be a list of keys and indices joined by '.' into it`);
    }
  }
  for (const check of stored) check();
  return listing.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
}
