//! Points: on each paid order, credit the user `floor(amount × rate)` points (`--config
//! rate=0.1`, default 1), keep the balance in state and emit `points.credited` (`--config
//! output=TOPIC` to emit elsewhere).

use serde::{Deserialize, Serialize};
use weir_sdk::{consumer, Context, Record, Result};

/// An `order.paid` event.
#[derive(Deserialize)]
pub struct Paid {
    /// Order id.
    pub order: u64,
    /// Paying user.
    pub user: String,
    /// Amount paid.
    pub amount: f64,
}

/// A `points.credited` event.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Credited {
    /// User.
    pub user: String,
    /// Order that earned the points.
    pub order: u64,
    /// Points credited.
    pub points: u64,
    /// Balance after the credit.
    pub balance: u64,
}

/// Credits points for one paid order.
#[consumer]
pub fn credit_points(record: &Record, ctx: &mut Context) -> Result<()> {
    let paid: Paid = record.json()?;
    let rate: f64 = ctx.config_or("rate", 1.0)?;
    let output = ctx.config_or("output", "points.credited".to_string())?;
    let points = (paid.amount * rate).floor().max(0.0) as u64;
    let key = format!("balance/{}", paid.user);
    let balance = ctx.get::<u64>(&key)?.unwrap_or(0) + points;
    ctx.put(&key, &balance)?;
    let credited = Credited {
        user: paid.user,
        order: paid.order,
        points,
        balance,
    };
    ctx.emit_json(&output, Some(&credited.user), &credited)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weir_sdk::codec::InRecord;
    use weir_sdk::MemoryState;

    use super::*;

    fn run(
        values: &[&str],
        config: &[(&str, &str)],
        state: &mut MemoryState,
    ) -> Result<Vec<Credited>> {
        let config: BTreeMap<String, String> = config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut ctx = Context::new(state, &config);
        for (i, v) in values.iter().enumerate() {
            let record = InRecord {
                offset: i as u64,
                timestamp_ms: 0,
                partition: 0,
                key: None,
                value: v.as_bytes(),
                id: None,
                headers: vec![],
            };
            credit_points(&Record::new(record), &mut ctx)?;
        }
        Ok(ctx
            .outputs()
            .iter()
            .map(|o| serde_json::from_slice(&o.value).unwrap())
            .collect())
    }

    #[test]
    fn credits_floor_of_amount_times_rate_and_keeps_balances() {
        let mut state = MemoryState::default();
        let out = run(
            &[
                r#"{"order":1,"user":"ann","amount":99.9}"#,
                r#"{"order":2,"user":"bob","amount":5}"#,
                r#"{"order":3,"user":"ann","amount":10}"#,
            ],
            &[("rate", "0.1")],
            &mut state,
        )
        .unwrap();
        assert_eq!(
            out.iter()
                .map(|c| (c.points, c.balance))
                .collect::<Vec<_>>(),
            vec![(9, 9), (0, 0), (1, 10)]
        );
        assert_eq!(state.get_json::<u64>("balance/ann"), Some(10));
    }

    #[test]
    fn bad_input_and_bad_config_are_errors() {
        let mut state = MemoryState::default();
        assert!(run(&["not json"], &[], &mut state)
            .unwrap_err()
            .message()
            .contains("expected JSON"));
        let err = run(
            &[r#"{"order":1,"user":"a","amount":1}"#],
            &[("rate", "lots")],
            &mut state,
        )
        .unwrap_err();
        assert!(err.message().contains("rate=\"lots\""), "{err}");
    }
}
