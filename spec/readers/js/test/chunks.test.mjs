// Format 1.1 per-chunk digests in manifest.json: parsed strictly, never trusted in place of the
// whole-file digest by this reader.
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { CheckpointCorruptedError, LIMITS, parseManifest, readCheckpoint } from "../reader.mjs";

const VECTORS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../vectors");
const CHUNKED = path.join(VECTORS, "valid", "chunks", "step-00000008");
const DIGEST = "0a".repeat(32);

const manifest = (entry) => new TextEncoder().encode(
  `{"format": "safeckpt", "format_version": "1.1", "step": 1, "files": {"model.safetensors": ${entry}}}`,
);
const rejects = (entry, message) => assert.throws(() => parseManifest(manifest(entry), "m/manifest.json"), (error) => {
  assert.ok(error instanceof CheckpointCorruptedError, String(error));
  assert.match(error.message, /^m\/manifest\.json: invalid manifest: /);
  assert.match(error.message, message);
  return true;
});

test("the chunked vector's digests are parsed and kept", () => {
  const ckpt = readCheckpoint(CHUNKED);
  const entry = ckpt.manifest.files.find((e) => e.name === "model.safetensors");
  assert.equal(entry.chunks.size, 65536);
  assert.equal(entry.chunks.sha256.length, Math.ceil(entry.size / 65536));
  assert.equal(ckpt.manifest.files.find((e) => e.name === "config.json").chunks, null);
  assert.deepEqual(ckpt.manifest.formatVersion, [1, 1]);
});

test("valid chunk layouts", () => {
  const files = (entry) => parseManifest(manifest(entry), "m").files[0];
  assert.deepEqual(files(`{"size": 65537, "sha256": "${DIGEST}", "chunks": {"size": 65536, "sha256": ["${DIGEST}", "${DIGEST}"], "later": 1}}`).chunks,
    { size: 65536, sha256: [DIGEST, DIGEST] });
  assert.equal(files(`{"size": 1, "sha256": "${DIGEST}", "chunks": {"size": ${LIMITS.MAX_CHUNK_BYTES}, "sha256": ["${DIGEST}"]}}`).chunks.size, 2 ** 40);
  // a file of 2^62 bytes in chunks of 2^40: 2^22 digests would be needed, the count is exact
  rejects(`{"size": 4611686018427387904, "sha256": "${DIGEST}", "chunks": {"size": 1099511627776, "sha256": ["${DIGEST}"]}}`, /must list 4194304 digests/);
});

test("malformed chunks are refused, naming manifest.json", () => {
  const entry = (chunks, size = 10) => `{"size": ${size}, "sha256": "${DIGEST}", "chunks": ${chunks}}`;
  rejects(entry("null"), /'chunks' of "model.safetensors" must be an object/);
  rejects(entry(`"65536"`), /must be an object/);
  rejects(entry(`{"sha256": ["${DIGEST}"]}`), /'chunks.size' of "model.safetensors" is absent, expected a power of two from 65536 to 1099511627776/);
  rejects(entry(`{"size": true, "sha256": ["${DIGEST}"]}`), /'chunks.size' .* is true/);
  rejects(entry(`{"size": 65536.0, "sha256": ["${DIGEST}"]}`), /is 65536\.0,/);
  rejects(entry(`{"size": 98304, "sha256": ["${DIGEST}"]}`), /is 98304,/);
  rejects(entry(`{"size": 2199023255552, "sha256": ["${DIGEST}"]}`), /is 2199023255552,/);
  rejects(entry(`{"size": 36893488147419103232, "sha256": ["${DIGEST}"]}`), /is 36893488147419103232,/); // BigInt
  rejects(entry(`{"size": 65536}`), /'chunks.sha256' of "model.safetensors" must list 1 digest,/);
  rejects(entry(`{"size": 65536, "sha256": "${DIGEST}"}`), /must list 1 digest,/);
  rejects(entry(`{"size": 65536, "sha256": []}`), /must list 1 digest,/);
  rejects(entry(`{"size": 65536, "sha256": ["${DIGEST.toUpperCase()}"]}`), /64 lower-case hex digits each/);
  rejects(entry(`{"size": 65536, "sha256": [7]}`), /64 lower-case hex digits each/);
  rejects(entry(`{"size": 65536, "sha256": []}`, 0), /not allowed: the file is empty/);
});

test("files are verified by their whole-file digest", () => {
  const copy = fs.mkdtempSync(path.join(os.tmpdir(), "safeckpt-chunks-"));
  try {
    fs.cpSync(CHUNKED, copy, { recursive: true });
    const file = path.join(copy, "manifest.json");
    const doc = JSON.parse(fs.readFileSync(file, "utf-8"));
    doc.files["model.safetensors"].sha256 = DIGEST; // chunk digests still right: the checkpoint is invalid
    fs.writeFileSync(file, JSON.stringify(doc));
    assert.throws(() => readCheckpoint(copy), /model\.safetensors: SHA-256 is [0-9a-f]{64}, manifest\.json says (0a){32}/);
  } finally {
    fs.rmSync(copy, { recursive: true });
  }
});
