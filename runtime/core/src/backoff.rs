//! Exponential backoff: the one retry pacing of the server (partition loops, forwarders) and the
//! client (the idempotent producer).

use std::time::Duration;

/// Delays that double from `first` up to `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `first`, never above `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            next: first,
            max,
        }
    }

    /// The delay to wait now; the following one is twice as long (up to the maximum).
    pub fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_maximum_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(50), ms(300));
        let delays: Vec<Duration> = (0..5).map(|_| b.next()).collect();
        assert_eq!(delays, vec![ms(50), ms(100), ms(200), ms(300), ms(300)]);
        b.reset();
        assert_eq!(b.next(), ms(50));
    }
}
