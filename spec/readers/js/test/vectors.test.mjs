// Runs every conformance vector of spec/vectors through the reader and the CLI.
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { JsonFloat, parseJson, stringify } from "../json.mjs";
import { CANONICAL, readCheckpoint, tensorSha256, walkTree } from "../reader.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const VECTORS = path.resolve(HERE, "../../../vectors");
const CLI = path.resolve(HERE, "../cli.mjs");

function vectors(kind) {
  const root = path.join(VECTORS, kind);
  return fs.readdirSync(root).sort().map((name) => path.join(root, name)).filter((dir) => fs.existsSync(path.join(dir, "expected.json")));
}

const expectedOf = (dir) => parseJson(fs.readFileSync(path.join(dir, "expected.json")), { typed: true });

// One string per value that tells ints from floats, -0.0 from 0.0 and ignores object key order.
function key(value) {
  if (typeof value === "bigint" || (typeof value === "number" && Number.isInteger(value))) return `i:${value}`;
  if (value instanceof JsonFloat) return `f:${Object.is(value.value, -0) ? "-0" : String(value.value)}`;
  if (typeof value === "number") return `f:${value}`;
  if (Array.isArray(value)) return `[${value.map(key).join(",")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${key(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

const same = (actual, expected, what) => assert.equal(key(actual), key(expected), what);
const facts = (t) => ({ dtype: t.dtype, shape: t.shape, sha256: tensorSha256(t) });

for (const dir of vectors("valid")) {
  test(`valid/${path.basename(dir)}`, () => {
    const expected = expectedOf(dir);
    const ckpt = readCheckpoint(path.join(dir, expected.path));
    same(ckpt.step, expected.step, "step");
    same(ckpt.typedConfig, expected.config, "config");
    same(ckpt.typedVocab, expected.vocab, "vocab");
    same(ckpt.manifest.raw.metadata ?? {}, expected.metadata, "metadata");
    same(Object.fromEntries([...ckpt.model].map(([name, t]) => [name, facts(t)])), expected.model, "model");
    for (const [alias, stored] of Object.entries(expected.aliases)) assert.equal(ckpt.model.get(alias), ckpt.model.get(stored), alias);
    for (const name of ["optimizer", "scheduler", "rng", "extra"]) same(ckpt.canonicalTree(name), expected.trees[name], name);
    const rows = [...ckpt.archives].flatMap(([file, list]) => list.map((t) => ({ file, name: t.name, ...facts(t) })));
    same(rows, expected.tensors, "tensors");
  });

  test(`cli valid/${path.basename(dir)}`, () => {
    const expected = expectedOf(dir);
    const out = parseJson(execFileSync(process.execPath, [CLI, path.join(dir, expected.path)]), { typed: true });
    same(out, { step: expected.step, config: expected.config, vocab: expected.vocab, tensors: expected.tensors }, "cli output");
  });
}

for (const dir of vectors("invalid")) {
  test(`invalid/${path.basename(dir)}`, () => {
    const expected = expectedOf(dir);
    assert.throws(() => readCheckpoint(path.join(dir, expected.path)), (error) => {
      assert.equal(error.name, expected.error, error.message);
      assert.ok(error.message.includes(expected.error_file), `message does not name ${expected.error_file}: ${error.message}`);
      return true;
    });
  });

  test(`cli invalid/${path.basename(dir)}`, () => {
    const expected = expectedOf(dir);
    const run = spawnSync(process.execPath, [CLI, path.join(dir, expected.path)], { encoding: "utf-8" });
    assert.equal(run.status, 1);
    assert.equal(run.stdout, "");
    assert.match(run.stderr, new RegExp(`^error: ${expected.error}: .*${expected.error_file.replace(".", "\\.")}`));
  });
}

test("native values: tuples, int-keyed maps, bytes, typed arrays", () => {
  const ckpt = readCheckpoint(path.join(VECTORS, "valid", "trees", "step-00000003"));
  const extra = ckpt.trees.extra;
  assert.ok(extra instanceof Map);
  assert.equal(extra.get("floats").constructor.name, "Tuple");
  const intKeys = extra.get("int_keys");
  assert.equal(intKeys.get(1), "the int one");
  assert.equal(intKeys.get("1"), "the string one");
  assert.equal(intKeys.get(18446744073709551615n), "max");
  assert.deepEqual([...extra.get("bytes")[1]], [0, 255, 128]);
  const step = ckpt.trees.optimizer.get("state").get(0).get("step");
  assert.deepEqual([...step.data], [3]);
  assert.equal(ckpt.trees.optimizer.get("param_groups")[0].get("betas")[1], 0.999);
  const dtypes = readCheckpoint(path.join(VECTORS, "valid", "all-dtypes", "step-00000001")).model;
  assert.deepEqual([...dtypes.get("i64").data], [-(2n ** 63n), -1n, 0n, 2n ** 63n - 1n]);
  assert.deepEqual([...dtypes.get("c64").data], [1, 2, -0.5, -1]);
  assert.ok(Number.isNaN(dtypes.get("f32").data[1]));
});

test("misaligned tensor data is copied into an aligned typed array", () => {
  const model = readCheckpoint(path.join(VECTORS, "valid", "foreign-archive", "step-00000006")).model;
  assert.deepEqual([...model.get("f32").data], [0.5, -1]);
  assert.deepEqual([...model.get("i64").data], [9n]);
});

test("JSON strictness", () => {
  const enc = (s) => new TextEncoder().encode(s);
  for (const bad of ['{"a":1,"a":2}', "[NaN]", "1e400", '"\\ud800"', "[1] [2]", "01", "\ufeff{}", '{"a":}']) {
    assert.throws(() => parseJson(enc(bad)), undefined, bad);
  }
  assert.equal(stringify(parseJson(enc('{"x": [1.0, 2, -0.0, 12345678901234567890]}'), { typed: true })), '{"x":[1.0,2,-0.0,12345678901234567890]}');
  assert.throws(() => walkTree({ version: 1, root: { dict: [[true, 1]] } }, { source: "s", resolve: () => null, build: CANONICAL }), /dict keys/);
});
