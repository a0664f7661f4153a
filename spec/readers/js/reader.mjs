// Reference reader for safeckpt checkpoints, format version 1 (spec/FORMAT.md), for Node >= 18.
//
//   import { readCheckpoint } from "./reader.mjs";
//   const ckpt = readCheckpoint("checkpoints");          // newest committed step-* folder
//   ckpt.model.get("embed.weight").data                   // Float32Array
//
// Order of work, as the spec requires: locate -> parse manifest.json -> open, size-check, read
// and SHA-256 every listed file -> only then parse any of them. Format 1.1 per-chunk digests are
// validated but not used: they let a reader hash one file on many cores, and this one hashes on
// one, where the whole-file digest proves the same bytes.

import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import { CheckpointCorruptedError, CheckpointNotFoundError, UnsupportedFormatError } from "./errors.mjs";
import { JsonError, JsonFloat, parseJson, plain, stringify } from "./json.mjs";
import { decodeMsgpack, MsgFloat } from "./msgpack.mjs";
import { parseArchive } from "./safetensors.mjs";
import { checkSharding, MAX_SHARDING_BYTES, SHARDING_NAME } from "./sharding.mjs";

export * from "./errors.mjs";
export { Tensor } from "./safetensors.mjs";

/** The bounds of spec/FORMAT.md, "Limits" (the same numbers as safeckpt/limits.py). */
export const LIMITS = {
  MAX_MANIFEST_BYTES: 16 * 1024 * 1024,
  MAX_FILES: 4096,
  MIN_CHUNK_BYTES: 64 * 1024,
  MAX_CHUNK_BYTES: 2 ** 40,
  MAX_FILE_NAME_LENGTH: 128,
  MAX_SAFETENSORS_HEADER_BYTES: 100 * 1024 * 1024,
  MAX_TENSORS_PER_FILE: 1_000_000,
  MAX_TENSOR_NDIM: 64,
  MAX_DOCUMENT_BYTES: 512 * 1024 * 1024,
  MAX_JSON_BYTES: 64 * 1024 * 1024,
  MAX_DOCUMENT_ITEMS: 10_000_000,
  MAX_STEP: 2n ** 63n - 1n,
  MAX_NESTING_DEPTH: 64,
  MAX_MSGPACK_DEPTH: 3 * 64 + 2,
};

export const FORMAT_NAME = "safeckpt";
export const FORMAT_MAJOR = 1;
export const MANIFEST_NAME = "manifest.json";
export const TREES = ["optimizer", "scheduler", "rng", "extra"];
export const ALIASES_KEY = "safeckpt.aliases";
const FILE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
const STEP_NAME = /^step-([0-9]{1,19})$/;
const SHA256_HEX = /^[0-9a-f]{64}$/;

/** A msgpack tuple (a list that must come back as a tuple). */
export class Tuple extends Array {}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Uint8Array);
const isInt = (v) => (typeof v === "number" && Number.isInteger(v)) || typeof v === "bigint";
const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex");

/** Resolve a checkpoint folder, its manifest.json, or a root of step-* folders (newest committed). */
export function locateCheckpoint(target) {
  const stat = statOrNull(target);
  if (path.basename(target) === MANIFEST_NAME && stat?.isFile()) return path.dirname(target);
  if (statOrNull(path.join(target, MANIFEST_NAME))) return target;
  if (stat?.isDirectory()) {
    let best = null;
    for (const entry of fs.readdirSync(target, { withFileTypes: true })) {
      const match = STEP_NAME.exec(entry.name);
      if (!match || !entry.isDirectory()) continue; // a symlink is not a checkpoint folder
      if (!statOrNull(path.join(target, entry.name, MANIFEST_NAME))?.isFile()) continue; // never committed
      const step = BigInt(match[1]);
      if (best === null || step > best.step || (step === best.step && entry.name > best.name)) best = { step, name: entry.name };
    }
    if (best !== null) return path.join(target, best.name);
    if (STEP_NAME.test(path.basename(target))) {
      throw new CheckpointNotFoundError(`${path.join(target, MANIFEST_NAME)}: missing; the checkpoint was never committed (its save was interrupted)`);
    }
    throw new CheckpointNotFoundError(`${target}: no checkpoint here (no ${MANIFEST_NAME} and no committed step-* folders)`);
  }
  throw new CheckpointNotFoundError(`${target}: checkpoint does not exist`);
}

function statOrNull(p) {
  try {
    return fs.statSync(p);
  } catch {
    return null;
  }
}

/** Read a listed file without following links; a regular file of the expected size, or throw. */
function readRegular(file, { size = null, limit = null, missing }) {
  let fd;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch (error) {
    if (error.code === "ENOENT") throw new CheckpointNotFoundError(`${file}: ${missing}`);
    if (error.code === "ELOOP") throw new CheckpointCorruptedError(`${file}: is a symbolic link; checkpoint files must be regular files`);
    throw new CheckpointCorruptedError(`${file}: cannot be opened (${error.code})`);
  }
  try {
    const info = fs.fstatSync(fd);
    if (!info.isFile()) throw new CheckpointCorruptedError(`${file}: is not a regular file`);
    if (limit !== null && info.size > limit) throw new CheckpointCorruptedError(`${file}: is ${info.size} bytes, over the limit of ${limit}`);
    if (size !== null && info.size !== size) {
      throw new CheckpointCorruptedError(`${file}: size is ${info.size} bytes, manifest.json says ${size}; the file is truncated or damaged`);
    }
    const buffer = new Uint8Array(info.size);
    let filled = 0;
    while (filled < info.size) {
      const got = fs.readSync(fd, buffer, filled, info.size - filled, null);
      if (got === 0) break;
      filled += got;
    }
    if (filled !== info.size) throw new CheckpointCorruptedError(`${file}: changed size while being read`);
    return buffer;
  } finally {
    fs.closeSync(fd);
  }
}

/** Parse and validate manifest.json bytes (spec/FORMAT.md, "manifest.json"). */
export function parseManifest(bytes, source) {
  const fail = (what) => {
    throw new CheckpointCorruptedError(`${source}: invalid manifest: ${what}`);
  };
  const doc = jsonDocument(bytes, source, LIMITS.MAX_MANIFEST_BYTES);
  if (!isObject(doc)) fail("expected a JSON object");
  if (doc.format !== FORMAT_NAME) throw new UnsupportedFormatError(`${source}: 'format' is ${JSON.stringify(plain(doc.format) ?? null)}, expected "safeckpt"; not a safeckpt manifest`);
  const version = typeof doc.format_version === "string" ? /^([0-9]{1,6})\.([0-9]{1,6})$/.exec(doc.format_version) : null;
  if (version === null) fail("'format_version' must be a string 'MAJOR.MINOR'");
  const [major, minor] = [Number(version[1]), Number(version[2])];
  if (major !== FORMAT_MAJOR) throw new UnsupportedFormatError(`${source}: format version ${major}.${minor} is not supported by this reader (it reads ${FORMAT_MAJOR}.x)`);
  const { step, created = "", producer = {}, metadata = {}, files } = doc;
  if (!isInt(step) || step < 0 || BigInt(step) > LIMITS.MAX_STEP) fail(`'step' must be an integer from 0 to ${LIMITS.MAX_STEP}`);
  if (typeof created !== "string") fail("'created' must be a string");
  if (!isObject(producer) || !Object.values(producer).every((v) => typeof v === "string")) fail("'producer' must be an object of strings");
  if (!isObject(metadata)) fail("'metadata' must be an object");
  if (!isObject(files)) fail("'files' must be an object mapping file names to entries");
  const names = Object.keys(files).sort();
  if (names.length > LIMITS.MAX_FILES) fail(`lists ${names.length} files, more than the limit of ${LIMITS.MAX_FILES}`);
  const entries = names.map((name) => {
    if (!FILE_NAME.test(name) || name === MANIFEST_NAME) fail(`file name ${JSON.stringify(name)} is not allowed (no paths, no '..', no leading dot)`);
    const entry = files[name];
    if (!isObject(entry)) fail(`entry for ${JSON.stringify(name)} must be an object`);
    if (!isInt(entry.size) || entry.size < 0 || BigInt(entry.size) > LIMITS.MAX_STEP) fail(`'size' of ${JSON.stringify(name)} must be a non-negative integer`);
    if (typeof entry.sha256 !== "string" || !SHA256_HEX.test(entry.sha256)) fail(`'sha256' of ${JSON.stringify(name)} must be 64 lower-case hex digits`);
    const chunks = Object.prototype.hasOwnProperty.call(entry, "chunks") ? parseChunks(name, BigInt(entry.size), entry.chunks, fail) : null;
    return { name, size: Number(entry.size), sha256: entry.sha256, chunks };
  });
  return { formatVersion: [major, minor], step, created, producer, metadata: plain(metadata), files: entries, raw: doc };
}

/** A file entry's "chunks" (format 1.1): {size, sha256: [hex of each size-byte piece, in order]}. */
function parseChunks(name, fileSize, chunks, fail) {
  const quoted = JSON.stringify(name);
  if (!isObject(chunks)) fail(`'chunks' of ${quoted} must be an object with 'size' and 'sha256'`);
  const { size, sha256: digests } = chunks;
  const inRange = typeof size === "number" && Number.isInteger(size) && size >= LIMITS.MIN_CHUNK_BYTES && size <= LIMITS.MAX_CHUNK_BYTES;
  if (!inRange || (BigInt(size) & (BigInt(size) - 1n)) !== 0n) {
    fail(`'chunks.size' of ${quoted} is ${shown(size)}, expected a power of two from ${LIMITS.MIN_CHUNK_BYTES} to ${LIMITS.MAX_CHUNK_BYTES}`);
  }
  if (fileSize === 0n) fail(`'chunks' of ${quoted} is not allowed: the file is empty, it has no chunk to digest`);
  const count = (fileSize + BigInt(size) - 1n) / BigInt(size);
  if (!Array.isArray(digests) || BigInt(digests.length) !== count) {
    fail(`'chunks.sha256' of ${quoted} must list ${count} digest${count === 1n ? "" : "s"}, one per ${size} bytes of a ${fileSize}-byte file`);
  }
  if (!digests.every((d) => typeof d === "string" && SHA256_HEX.test(d))) fail(`'chunks.sha256' of ${quoted} must hold 64 lower-case hex digits each`);
  return { size, sha256: [...digests] };
}

/** A manifest value for an error message: its JSON (floats keep their '.0'), cut to 80 characters. */
function shown(value) {
  const text = value === undefined ? "absent" : stringify(value);
  return text.length <= 80 ? text : `${text.slice(0, 77)}...`;
}

/** Parse the manifest, then read and verify every listed file; nothing else is parsed yet. */
export function readCheckpointFiles(folder, { verify = true } = {}) {
  const manifestPath = path.join(folder, MANIFEST_NAME);
  const raw = readRegular(manifestPath, { limit: LIMITS.MAX_MANIFEST_BYTES, missing: "missing; the checkpoint was never committed" });
  const manifest = parseManifest(raw, manifestPath);
  if (!manifest.files.some((e) => e.name === "model.safetensors" || e.name === SHARDING_NAME)) {
    throw new CheckpointCorruptedError(`${manifestPath}: does not list model.safetensors; the checkpoint is invalid`);
  }
  const buffers = new Map();
  for (const entry of manifest.files) {
    const file = path.join(folder, entry.name);
    const bytes = readRegular(file, { size: entry.size, missing: "file listed in manifest.json is missing; the checkpoint is incomplete" });
    if (verify) {
      const digest = sha256(bytes);
      if (digest !== entry.sha256) throw new CheckpointCorruptedError(`${file}: SHA-256 is ${digest}, manifest.json says ${entry.sha256}; the file is corrupted`);
    }
    buffers.set(entry.name, bytes);
  }
  return { manifest, buffers };
}

function archive(bytes, source) {
  return parseArchive(bytes, {
    limits: LIMITS,
    fail: (what) => {
      throw new CheckpointCorruptedError(`${source}: invalid safetensors archive: ${what}`);
    },
  });
}

/** Strict JSON with the format's bounds: size, nesting, '[' + '{' count, object member count. */
function jsonDocument(bytes, source, limit = LIMITS.MAX_JSON_BYTES) {
  const fail = (what) => {
    throw new CheckpointCorruptedError(`${source}: ${what}; the file is damaged or not a safeckpt file`);
  };
  if (bytes.byteLength > limit) fail(`JSON document of ${bytes.byteLength} bytes exceeds the limit of ${limit}`);
  let containers = 0;
  for (const b of bytes) if (b === 0x5b || b === 0x7b) containers++;
  if (containers > LIMITS.MAX_DOCUMENT_ITEMS) fail(`${containers} JSON arrays and objects exceed ${LIMITS.MAX_DOCUMENT_ITEMS}`);
  try {
    return parseJson(bytes, { typed: true, maxDepth: LIMITS.MAX_NESTING_DEPTH, maxMembers: LIMITS.MAX_DOCUMENT_ITEMS });
  } catch (error) {
    if (error instanceof JsonError) throw new CheckpointCorruptedError(`${source}: invalid JSON (${error.message})`);
    throw error;
  }
}

/**
 * Walk a decoded structure document (spec/FORMAT.md, "Structure documents"), validating it
 * and rebuilding it with `build`: {int, float, bytes, list, tuple, dict, tensor}.
 */
export function walkTree(document, { source, resolve, build }) {
  const fail = (what) => {
    throw new CheckpointCorruptedError(`${source}: invalid structure: ${what}`);
  };
  const node = (value, depth) => {
    if (depth > LIMITS.MAX_NESTING_DEPTH) fail(`nested deeper than ${LIMITS.MAX_NESTING_DEPTH} levels`);
    if (value === null || typeof value === "boolean" || typeof value === "string") return value;
    if (isInt(value)) return build.int(value);
    if (value instanceof MsgFloat) return build.float(value.value);
    if (value instanceof Uint8Array) return build.bytes(value);
    if (Array.isArray(value) || !isObject(value)) fail("expected a scalar or a one-key tag map");
    const keys = Object.keys(value);
    if (keys.length !== 1) fail(`a tag map has exactly one key, found ${keys.length}`);
    const [tag] = keys;
    const payload = value[tag];
    if (tag === "tensor") {
      if (typeof payload !== "string") fail("tensor reference must be a string");
      return build.tensor(resolve(payload));
    }
    if (tag === "list" || tag === "tuple") {
      if (!Array.isArray(payload)) fail(`${tag} payload must be an array`);
      return build[tag](payload.map((v) => node(v, depth + 1)));
    }
    if (tag === "dict") {
      if (!Array.isArray(payload)) fail("dict payload must be an array of pairs");
      const seen = new Set();
      const pairs = payload.map((pair) => {
        if (!Array.isArray(pair) || pair.length !== 2) fail("dict entries must be [key, value] pairs");
        const key = isInt(pair[0]) ? build.int(pair[0]) : pair[0];
        if (typeof key !== "string" && !isInt(key)) fail("dict keys must be str or int");
        const id = `${typeof key === "string" ? "s" : "i"}:${key}`;
        if (seen.has(id)) fail(`duplicate dict key ${String(key)}`);
        seen.add(id);
        return [key, node(pair[1], depth + 1)];
      });
      return build.dict(pairs);
    }
    fail(`unknown tag ${JSON.stringify(tag)}`);
  };
  if (!isObject(document) || Object.keys(document).sort().join(",") !== "root,version") fail("expected a map with keys 'version' and 'root'");
  if (!isInt(document.version) || normalInt(document.version) !== 1) fail("structure version must be the integer 1");
  return node(document.root, 0);
}

const normalInt = (v) => (typeof v === "bigint" && v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v);

/** Native JavaScript values: dict -> Map, tuple -> Tuple, bytes -> Uint8Array, float -> number. */
export const NATIVE = {
  int: normalInt,
  float: (v) => v,
  bytes: (v) => v,
  list: (items) => items,
  tuple: (items) => Tuple.from(items),
  dict: (pairs) => new Map(pairs),
  tensor: (t) => t,
};

/** The expected-JSON encoding of spec/FORMAT.md ("Conformance vectors"). */
export const CANONICAL = {
  int: normalInt,
  float: (v) => ({ float: Number.isNaN(v) ? "nan" : v === Infinity ? "inf" : v === -Infinity ? "-inf" : new JsonFloat(v) }),
  bytes: (v) => ({ bytes: Buffer.from(v).toString("hex") }),
  list: (items) => ({ list: items }),
  tuple: (items) => ({ tuple: items }),
  dict: (pairs) => ({ dict: pairs }),
  tensor: (t) => ({ tensor: { dtype: t.dtype, shape: t.shape, sha256: sha256(t.bytes) } }),
};

/**
 * Read, verify and decode a checkpoint. Returns {path, step, manifest, config, vocab, metadata,
 * model: Map(name -> Tensor, aliases included), aliases, archives: Map(file -> Tensor[] in data
 * order), trees: {optimizer, scheduler, rng, extra} (null when absent), canonicalTree(name)}.
 */
export function readCheckpoint(target, { verify = true } = {}) {
  const folder = locateCheckpoint(target);
  const { manifest, buffers } = readCheckpointFiles(folder, { verify });
  if (buffers.has(SHARDING_NAME)) return readSharded(folder, manifest, buffers);
  const archives = new Map();
  const modelSource = path.join(folder, "model.safetensors");
  const { tensors, metadata } = archive(buffers.get("model.safetensors"), modelSource);
  archives.set("model.safetensors", tensors);
  const model = new Map(tensors.map((t) => [t.name, t]));
  let aliases = {};
  if (Object.prototype.hasOwnProperty.call(metadata, ALIASES_KEY)) {
    aliases = jsonDocument(new TextEncoder().encode(metadata[ALIASES_KEY]), modelSource);
    const ok = isObject(aliases) && Object.entries(aliases).every(([k, v]) => typeof v === "string" && model.has(v) && !model.has(k));
    if (!ok) throw new CheckpointCorruptedError(`${modelSource}: invalid ${ALIASES_KEY} metadata; the file is damaged`);
    for (const [alias, stored] of Object.entries(aliases)) model.set(alias, model.get(stored));
  }
  const documents = {};
  const resolvers = {};
  for (const name of TREES) {
    const docName = `${name}.msgpack`;
    const archiveName = `${name}.safetensors`;
    if (!buffers.has(docName) && !buffers.has(archiveName)) continue;
    for (const needed of [docName, archiveName]) {
      if (!buffers.has(needed)) throw new CheckpointCorruptedError(`${path.join(folder, MANIFEST_NAME)}: lists ${name} state without ${needed}; the checkpoint is invalid`);
    }
    const treeTensors = archive(buffers.get(archiveName), path.join(folder, archiveName)).tensors;
    archives.set(archiveName, treeTensors);
    const byName = new Map(treeTensors.map((t) => [t.name, t]));
    const docSource = path.join(folder, docName);
    try {
      const bytes = buffers.get(docName);
      if (bytes.byteLength > LIMITS.MAX_DOCUMENT_BYTES) throw new Error(`document of ${bytes.byteLength} bytes exceeds ${LIMITS.MAX_DOCUMENT_BYTES}`);
      documents[name] = decodeMsgpack(bytes, { maxDepth: LIMITS.MAX_MSGPACK_DEPTH, maxItems: LIMITS.MAX_DOCUMENT_ITEMS });
    } catch (error) {
      if (error instanceof CheckpointCorruptedError) throw error;
      throw new CheckpointCorruptedError(`${docSource}: invalid msgpack (${error.message})`);
    }
    resolvers[name] = (tensorName) => {
      if (!byName.has(tensorName)) throw new CheckpointCorruptedError(`${docSource}: refers to tensor ${JSON.stringify(tensorName)}, absent from ${archiveName}`);
      return byName.get(tensorName);
    };
    walkTree(documents[name], { source: docSource, resolve: resolvers[name], build: CANONICAL }); // validate now
  }
  const trees = Object.fromEntries(TREES.map((name) => [name, name in documents
    ? walkTree(documents[name], { source: path.join(folder, `${name}.msgpack`), resolve: resolvers[name], build: NATIVE })
    : null]));
  const typed = {};
  for (const name of ["config", "vocab"]) {
    const file = `${name}.json`;
    typed[name] = buffers.has(file) ? jsonDocument(buffers.get(file), path.join(folder, file)) : null;
  }
  return {
    path: folder,
    step: normalInt(manifest.step),
    manifest,
    config: plain(typed.config),
    vocab: plain(typed.vocab),
    typedConfig: typed.config,
    typedVocab: typed.vocab,
    metadata: manifest.metadata,
    model,
    aliases,
    archives: new Map([...archives].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))),
    trees,
    canonicalTree: (name) => (name in documents
      ? walkTree(documents[name], { source: name, resolve: resolvers[name], build: CANONICAL })
      : null),
  };
}

/**
 * A sharded checkpoint (format 1.2), verified: {path, step, manifest, config, vocab, metadata,
 * sharded: true, worldSize, tensors: [{key, dtype, shape, chunks}], archives: Map(shard -> Tensor[])}.
 * The tensors are listed, not assembled.
 */
function readSharded(folder, manifest, buffers) {
  const archives = new Map();
  const shards = new Map();
  for (const [name, bytes] of buffers) {
    if (!name.endsWith(".safetensors")) continue;
    const { tensors } = archive(bytes, path.join(folder, name));
    archives.set(name, tensors);
    shards.set(name, new Map(tensors.map((t) => [t.name, t])));
  }
  const source = path.join(folder, SHARDING_NAME);
  const doc = jsonDocument(buffers.get(SHARDING_NAME), source, MAX_SHARDING_BYTES);
  const tensors = checkSharding(plain(doc), { source, listed: new Set(manifest.files.map((e) => e.name)), shards });
  const typed = {};
  for (const name of ["config", "vocab"]) {
    const file = `${name}.json`;
    typed[name] = buffers.has(file) ? jsonDocument(buffers.get(file), path.join(folder, file)) : null;
  }
  return {
    path: folder, step: normalInt(manifest.step), manifest, config: plain(typed.config), vocab: plain(typed.vocab),
    typedConfig: typed.config, typedVocab: typed.vocab, metadata: manifest.metadata, sharded: true,
    worldSize: Number(plain(doc).world_size), tensors,
    archives: new Map([...archives].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))),
  };
}

/** sha256 hex digest of a Tensor's raw bytes. */
export function tensorSha256(tensor) {
  return sha256(tensor.bytes);
}

