// Native unit test of the plugin logic: no wasm, no server (node --test).

import { test } from "node:test";
import assert from "node:assert/strict";

import { MemoryState, PluginError, Record, run } from "./weir-plugin.js";
import creditPoints from "./app.js";

const paid = (order, user, amount) => new Record({ value: JSON.stringify({ order, user, amount }) });

test("credits floor of amount × rate and keeps the balance", () => {
  const state = new MemoryState();
  const outputs = run(creditPoints, [paid(1, "ann", 12.5), paid(2, "ann", 7.9)], state, { rate: "0.5" });
  assert.equal(state.getJson("balance/ann"), 6 + 3);
  assert.deepEqual(outputs.map((o) => o.topic), ["points.credited", "points.credited"]);
  assert.equal(new TextDecoder().decode(outputs[1].value), '{"user":"ann","order":2,"points":3,"balance":9}');
  assert.equal(new TextDecoder().decode(outputs[1].key), "ann");
});

test("a bad record is an error", () => {
  assert.throws(() => run(creditPoints, [new Record({ value: "not json" })], new MemoryState()), PluginError);
});
