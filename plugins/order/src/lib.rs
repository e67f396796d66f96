//! Flash-sale orders (the seed's 秒杀): each seckill request takes one unit of the item's
//! stock (config `stock`, per item) and emits `order.created` while stock lasts; afterwards,
//! or when the user already bought the item, it emits `order.rejected` with the reason.
//! Stock lives in plugin state, which weir commits with optimistic concurrency across
//! partitions, so it never oversells; once an item is sold out a request costs one read.

use serde::Deserialize;
use weir_sdk::{consumer, Context, Record, Result};

#[derive(Deserialize)]
struct Request {
    request: String,
    user: String,
    item: String,
}

/// Creates or rejects one order.
#[consumer]
pub fn take_order(record: &Record, ctx: &mut Context) -> Result<()> {
    let r: Request = record.json()?;
    let stock_key = format!("stock/{}", r.item);
    let stock = match ctx.get::<u64>(&stock_key)? {
        Some(s) => s,
        None => ctx.config_or("stock", 0u64)?,
    };
    let result = format!("result/{}", r.user);
    let reject = |ctx: &mut Context, reason: &str| -> Result<()> {
        ctx.put(
            &result,
            &serde_json::json!({ "status": "rejected", "reason": reason, "item": r.item }),
        )?;
        ctx.emit_json("order.rejected", Some(&r.user), &serde_json::json!({ "request": r.request, "user": r.user, "item": r.item, "reason": reason }))
    };
    if stock == 0 {
        return reject(ctx, "sold out");
    }
    let bought = format!("bought/{}/{}", r.item, r.user);
    if ctx.get::<bool>(&bought)?.unwrap_or(false) {
        return reject(ctx, "already bought");
    }
    ctx.put(&stock_key, &(stock - 1))?;
    ctx.put(&bought, &true)?;
    ctx.put(
        &result,
        &serde_json::json!({ "status": "ordered", "order": r.request, "item": r.item }),
    )?;
    ctx.emit_json(
        "order.created",
        Some(&r.user),
        &serde_json::json!({ "order": r.request, "user": r.user, "item": r.item }),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weir_sdk::codec::InRecord;
    use weir_sdk::MemoryState;

    use super::*;

    #[test]
    fn sells_exactly_the_stock_once_per_user() {
        let config: BTreeMap<String, String> = [("stock".to_string(), "2".to_string())].into();
        let mut state = MemoryState::default();
        let mut ctx = Context::new(&mut state, &config);
        for (i, user) in ["ann", "ann", "bob", "cy", "dee"].iter().enumerate() {
            let value = format!(r#"{{"request":"r{i}","user":"{user}","item":"phone"}}"#);
            let record = InRecord {
                offset: i as u64,
                timestamp_ms: 0,
                partition: 0,
                key: None,
                value: value.as_bytes(),
                id: None,
                headers: vec![],
            };
            take_order(&Record::new(record), &mut ctx).unwrap();
        }
        let topics: Vec<&str> = ctx.outputs().iter().map(|o| o.topic.as_str()).collect();
        assert_eq!(
            topics,
            vec![
                "order.created",
                "order.rejected",
                "order.created",
                "order.rejected",
                "order.rejected"
            ]
        );
        let reasons: Vec<String> = ctx
            .outputs()
            .iter()
            .filter(|o| o.topic == "order.rejected")
            .map(|o| {
                serde_json::from_slice::<serde_json::Value>(&o.value).unwrap()["reason"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(reasons, vec!["already bought", "sold out", "sold out"]);
        drop(ctx);
        assert_eq!(state.get_json::<u64>("stock/phone"), Some(0));
    }
}
