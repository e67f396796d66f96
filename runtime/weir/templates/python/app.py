"""{{name}}: counts records per key and emits each running count to `{{name}}.counts`."""

import weir_plugin as weir


@weir.consumer
def count(record, ctx):
    key = record.key_str() or "no-key"
    count = (ctx.get(f"count/{key}") or 0) + 1
    ctx.put(f"count/{key}", count)
    ctx.emit_json("{{name}}.counts", key, {"key": key, "count": count})


# The component's exports (componentize-py looks for `WitWorld` in the app module).
WitWorld = weir.WitWorld
