// Native unit test of the plugin: no wasm, no server (`npm test`, i.e. `node --test`).

import { test } from "node:test";
import assert from "node:assert/strict";

import { MemoryState, Record, run } from "./weir-plugin.js";
import count from "./app.js";

test("counts per key", () => {
  const state = new MemoryState();
  const records = ["ann", "bob", "ann"].map((key, offset) => new Record({ key, value: "{}", offset }));
  const outputs = run(count, records, state);
  assert.equal(outputs.length, 3);
  assert.equal(state.getJson("count/ann"), 2);
  assert.deepEqual(outputs[2].json(), { key: "ann", count: 2 });
});
