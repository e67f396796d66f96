//! Analytics filter: keeps the purchase events the data team asked for and emits only the
//! fields they need to `analytics.purchases` (config: `fields` comma list, `min_amount`,
//! `categories` comma list; an unset filter keeps everything).

use serde_json::{Map, Value};
use weir_sdk::{consumer, Context, Record, Result};

/// Filters and projects one purchase event.
#[consumer]
pub fn project(record: &Record, ctx: &mut Context) -> Result<()> {
    let event: Map<String, Value> = record.json()?;
    let min_amount: f64 = ctx.config_or("min_amount", 0.0)?;
    if event.get("amount").and_then(Value::as_f64).unwrap_or(0.0) < min_amount {
        return Ok(());
    }
    if let Some(categories) = ctx.config("categories") {
        let category = event.get("category").and_then(Value::as_str).unwrap_or("");
        if !categories.split(',').any(|c| c.trim() == category) {
            return Ok(());
        }
    }
    let projected: Map<String, Value> = match ctx.config("fields") {
        Some(fields) => fields
            .split(',')
            .filter_map(|f| {
                event
                    .get(f.trim())
                    .map(|v| (f.trim().to_string(), v.clone()))
            })
            .collect(),
        None => event,
    };
    ctx.emit_json("analytics.purchases", record.key_str(), &projected)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weir_sdk::codec::InRecord;
    use weir_sdk::MemoryState;

    use super::*;

    #[test]
    fn keeps_matching_events_and_only_the_asked_fields() {
        let config: BTreeMap<String, String> = [
            ("fields", "order,amount"),
            ("min_amount", "20"),
            ("categories", "phone, tv"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut state = MemoryState::default();
        let mut ctx = Context::new(&mut state, &config);
        let events = [
            r#"{"order":1,"user":"ann","amount":50,"category":"phone","address":"secret"}"#,
            r#"{"order":2,"user":"bob","amount":5,"category":"phone"}"#,
            r#"{"order":3,"user":"cy","amount":70,"category":"food"}"#,
            r#"{"order":4,"user":"dee","amount":20,"category":"tv"}"#,
        ];
        for (i, e) in events.iter().enumerate() {
            let record = InRecord {
                offset: i as u64,
                timestamp_ms: 0,
                partition: 0,
                key: None,
                value: e.as_bytes(),
                id: None,
                headers: vec![],
            };
            project(&Record::new(record), &mut ctx).unwrap();
        }
        let out: Vec<String> = ctx
            .outputs()
            .iter()
            .map(|o| String::from_utf8(o.value.clone()).unwrap())
            .collect();
        assert_eq!(
            out,
            vec![r#"{"amount":50,"order":1}"#, r#"{"amount":20,"order":4}"#]
        );
    }
}
