// Points in JavaScript: the same plugin as plugins/points (Rust) and examples/points-py, for the
// same inputs the same balances and outputs. On each paid order credit floor(amount × rate)
// points (config `rate`, default 1), keep the balance in state and emit `points.credited`
// (config `output` to emit elsewhere).

import { consumer } from "./weir-plugin.js";

export default consumer((record, ctx) => {
  const paid = record.json();
  const rate = ctx.configOr("rate", 1.0);
  const output = ctx.configOr("output", "points.credited");
  const points = Math.max(0, Math.floor(paid.amount * rate));
  const key = `balance/${paid.user}`;
  const balance = (ctx.get(key) ?? 0) + points;
  ctx.put(key, balance);
  ctx.emitJson(output, paid.user, { user: paid.user, order: paid.order, points, balance });
});
