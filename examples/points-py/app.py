"""Points in Python: the same plugin as plugins/points (Rust), for the same inputs the same
balances and outputs. On each paid order credit floor(amount × rate) points (config `rate`,
default 1), keep the balance in state and emit `points.credited` (config `output` to emit
elsewhere)."""

import math

import weir_plugin as weir


@weir.consumer
def credit_points(record, ctx):
    paid = record.json()
    rate = ctx.config_or("rate", 1.0)
    output = ctx.config_or("output", "points.credited")
    points = int(max(0.0, math.floor(paid["amount"] * rate)))
    key = f"balance/{paid['user']}"
    balance = (ctx.get(key) or 0) + points
    ctx.put(key, balance)
    credited = {"user": paid["user"], "order": paid["order"], "points": points, "balance": balance}
    ctx.emit_json(output, paid["user"], credited)


WitWorld = weir.WitWorld
