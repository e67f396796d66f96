//! The payment system of the sale: a share of the created orders paid, some payments
//! delivered twice with the same message id (its retries), published through gRPC here and
//! through Kafka by [`crate::kafka`].

use anyhow::{Context as _, Result};
use weir_api::{Client, Record};

use crate::{read_all, Sale};

/// A paid order as the payment system publishes it.
#[derive(Clone, Debug)]
pub struct Payment {
    /// Numeric order id (the request number).
    pub order: u64,
    /// Buyer.
    pub user: String,
    /// Amount.
    pub amount: u64,
}

impl Payment {
    /// The payment's message id: a repeat of the payment carries the same one.
    pub(crate) fn id(&self) -> String {
        format!("paid-{}", self.order)
    }

    pub(crate) fn value(&self) -> String {
        format!(
            r#"{{"order":{},"user":"{}","amount":{}}}"#,
            self.order, self.user, self.amount
        )
    }

    fn record(&self) -> Record {
        Record {
            key: Some(self.user.clone().into()),
            id: Some(self.id()),
            ..Record::from_value(self.value())
        }
    }
}

/// The payments as the payment system delivers them, in chunks of 500, each chunk followed
/// by a repeat of every tenth of its payments (same message id).
pub(crate) fn with_repeats(payments: &[Payment]) -> impl Iterator<Item = &Payment> {
    payments
        .chunks(500)
        .flat_map(|chunk| chunk.iter().chain(chunk.iter().step_by(10)))
}

/// Pays `pay_percent` of the created orders (deterministically by order id): the payments
/// to make.
///
/// # Errors
/// Reading the orders failed.
pub async fn payments(client: &Client, sale: &Sale) -> Result<Vec<Payment>> {
    let created = read_all(client, "order.created").await?;
    let mut payments = Vec::new();
    for o in &created {
        let request = o["order"].as_str().context("order id")?;
        let order: u64 = request.trim_start_matches("req-").parse()?;
        if (order.wrapping_mul(2_654_435_761) % 100) < sale.pay_percent {
            payments.push(Payment {
                order,
                user: o["user"].as_str().context("user")?.to_string(),
                amount: 20 + order.wrapping_mul(7_919) % 300,
            });
        }
    }
    Ok(payments)
}

/// [`payments`], published through gRPC with a few delivered twice (the payment system's
/// retries: same message id).
///
/// # Errors
/// Reading the orders or publishing failed.
pub async fn pay(client: &Client, sale: &Sale) -> Result<Vec<Payment>> {
    let payments = payments(client, sale).await?;
    let records: Vec<Record> = with_repeats(&payments).map(Payment::record).collect();
    for chunk in records.chunks(550) {
        client.publish("order.paid", None, chunk.to_vec()).await?;
    }
    Ok(payments)
}
