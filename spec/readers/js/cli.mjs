#!/usr/bin/env node
// node cli.mjs CHECKPOINT
//
// Verifies and reads a safeckpt checkpoint (a step folder, its manifest.json, or a root of
// step-* folders) and prints one JSON object: {"step", "config", "vocab", "tensors": [{"file",
// "name", "dtype", "shape", "sha256"}, ...]}, one entry per tensor stored in each archive (files
// by name, tensors in data order), sha256 being that of the tensor's raw little-endian bytes.
// For a sharded checkpoint (format 1.2) it adds "sharded_tensors": [{"key", "dtype", "shape",
// "chunks"}], each full tensor of sharding.json (the chunks themselves are in "tensors").
// Exit status: 0 on success, 1 when the checkpoint is missing or invalid (the message names the
// file), 2 on bad usage.

import { CheckpointError, readCheckpoint, tensorSha256 } from "./reader.mjs";
import { stringify } from "./json.mjs";

const args = process.argv.slice(2);
if (args.length !== 1 || args[0].startsWith("-")) {
  process.stderr.write("usage: node cli.mjs CHECKPOINT\n");
  process.exit(2);
}
try {
  const ckpt = readCheckpoint(args[0]);
  const tensors = [];
  for (const [file, list] of ckpt.archives) {
    for (const t of list) tensors.push({ file, name: t.name, dtype: t.dtype, shape: t.shape, sha256: tensorSha256(t) });
  }
  const out = { step: ckpt.step, config: ckpt.typedConfig, vocab: ckpt.typedVocab, tensors };
  if (ckpt.sharded) out.sharded_tensors = ckpt.tensors; // format 1.2: each full tensor, listed
  process.stdout.write(`${stringify(out)}\n`);
} catch (error) {
  if (!(error instanceof CheckpointError)) throw error;
  process.stderr.write(`error: ${error.name}: ${error.message}\n`);
  process.exit(1);
}
