// {{name}}: counts records per key and emits each running count to `{{name}}.counts`.

import { consumer } from "./weir-plugin.js";

export default consumer((record, ctx) => {
  const key = record.keyStr() ?? "no-key";
  const count = (ctx.get(`count/${key}`) ?? 0) + 1;
  ctx.put(`count/${key}`, count);
  ctx.emitJson("{{name}}.counts", key, { key, count });
});
