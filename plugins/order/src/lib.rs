//! Flash-sale orders (the seed's 秒杀): each seckill request takes one unit of the item's
//! stock and emits `order.created` while stock lasts; afterwards, or when the user already
//! bought the item, it emits `order.rejected` with the reason. The caller's result is state
//! `result/<item>/<user>` (`ordered`, or `rejected` with the reason; absent = still pending).
//!
//! Config: `stock` (units per item) and `shares` (default 1). With `shares = P` the stock is
//! split into P shares and input partition p sells only from share `p % P`, so partitions
//! never contend for one stock value and the drain scales with partitions; the total sold
//! still never exceeds `stock`. Requests keyed by user keep each user on one partition, so
//! "one per user" is checked where that user's requests are. With `shares = 1` every
//! partition sells from one value and weir's optimistic commit serialises them.

use serde::Deserialize;
use weir_sdk::{consumer, Context, Record, Result};

#[derive(Deserialize)]
struct Request {
    request: String,
    user: String,
    item: String,
}

/// This partition's share of `stock` when it is split into `shares`.
fn share(stock: u64, shares: u64, index: u64) -> u64 {
    stock / shares + u64::from(index < stock % shares)
}

/// Creates or rejects one order.
#[consumer]
pub fn take_order(record: &Record, ctx: &mut Context) -> Result<()> {
    let r: Request = record.json()?;
    let shares = ctx.config_or("shares", 1u64)?.max(1);
    let index = u64::from(record.partition()) % shares;
    let stock_key = format!("stock/{}/{index}", r.item);
    let stock = match ctx.get::<u64>(&stock_key)? {
        Some(s) => s,
        None => share(ctx.config_or("stock", 0u64)?, shares, index),
    };
    let result = format!("result/{}/{}", r.item, r.user);
    let bought = format!("bought/{}/{}", r.item, r.user);
    let reject = |ctx: &mut Context, reason: &str| -> Result<()> {
        // A repeat after a purchase must not turn the buyer's answer into a rejection.
        if !ctx.get::<bool>(&bought)?.unwrap_or(false) {
            ctx.put(
                &result,
                &serde_json::json!({ "status": "rejected", "reason": reason, "request": r.request }),
            )?;
        }
        ctx.emit_json("order.rejected", Some(&r.user), &serde_json::json!({ "request": r.request, "user": r.user, "item": r.item, "reason": reason }))
    };
    if ctx.get::<bool>(&bought)?.unwrap_or(false) {
        return reject(ctx, "already bought");
    }
    if stock == 0 {
        return reject(ctx, "sold out");
    }
    ctx.put(&stock_key, &(stock - 1))?;
    ctx.put(&bought, &true)?;
    ctx.put(
        &result,
        &serde_json::json!({ "status": "ordered", "order": r.request }),
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
        assert_eq!(state.get_json::<u64>("stock/phone/0"), Some(0));
        let ann: serde_json::Value = state.get_json("result/phone/ann").unwrap();
        assert_eq!(
            ann["status"], "ordered",
            "a repeat does not overwrite the purchase"
        );
        let dee: serde_json::Value = state.get_json("result/phone/dee").unwrap();
        assert_eq!(dee["reason"], "sold out");
    }

    #[test]
    fn shares_split_the_stock_exactly() {
        for (stock, shares) in [(1000, 4), (7, 3), (2, 5), (0, 2)] {
            let total: u64 = (0..shares).map(|i| share(stock, shares, i)).sum();
            assert_eq!(total, stock);
        }
    }
}
