//! Red envelopes: a user whose paid orders in a campaign reach `threshold` gets one cash red
//! envelope of `amount`, at most once per user per campaign (config: `campaign`, `threshold`,
//! `amount`). Emits `red-envelope.grants`.

use serde::Deserialize;
use weir_sdk::{consumer, Context, Record, Result};

#[derive(Deserialize)]
struct Paid {
    user: String,
}

/// Counts a user's paid orders and grants the envelope when the threshold is reached.
#[consumer]
pub fn grant(record: &Record, ctx: &mut Context) -> Result<()> {
    let paid: Paid = record.json()?;
    let campaign = ctx.config("campaign").unwrap_or("default").to_string();
    let threshold: u64 = ctx.config_or("threshold", 3)?;
    let amount: u64 = ctx.config_or("amount", 10)?;
    let granted_key = format!("granted/{campaign}/{}", paid.user);
    if ctx.get::<bool>(&granted_key)?.unwrap_or(false) {
        return Ok(());
    }
    let count_key = format!("paid/{campaign}/{}", paid.user);
    let count = ctx.get::<u64>(&count_key)?.unwrap_or(0) + 1;
    ctx.put(&count_key, &count)?;
    if count >= threshold {
        ctx.put(&granted_key, &true)?;
        let grant = serde_json::json!({ "user": paid.user, "campaign": campaign, "amount": amount, "at_ms": record.timestamp_ms() });
        ctx.emit_json("red-envelope.grants", Some(&paid.user), &grant)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weir_sdk::codec::InRecord;
    use weir_sdk::MemoryState;

    use super::*;

    #[test]
    fn grants_once_when_the_threshold_is_reached() {
        let config: BTreeMap<String, String> = [("threshold", "2"), ("campaign", "1111")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut state = MemoryState::default();
        let mut ctx = Context::new(&mut state, &config);
        for (i, user) in ["ann", "bob", "ann", "ann", "ann"].iter().enumerate() {
            let value = format!(r#"{{"user":"{user}"}}"#);
            let record = InRecord {
                offset: i as u64,
                timestamp_ms: 5,
                partition: 0,
                key: None,
                value: value.as_bytes(),
                id: None,
                headers: vec![],
            };
            grant(&Record::new(record), &mut ctx).unwrap();
        }
        let grants: Vec<serde_json::Value> = ctx
            .outputs()
            .iter()
            .map(|o| serde_json::from_slice(&o.value).unwrap())
            .collect();
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0]["user"], "ann");
        assert_eq!(grants[0]["campaign"], "1111");
    }
}
