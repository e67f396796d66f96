//! The dead letter of a record that failed every attempt: its key, value and headers plus
//! `weir-error` (why) and `weir-source` (topic/partition@offset), made to fit the limits the
//! broker applies to the dead-letter topic. A committed output the broker refuses would block
//! the partition's outbox for good, so nothing here may exceed them: the error is cut to fit,
//! and when the record itself leaves no room (its value near the record limit) the value is
//! left out and `weir-value-omitted` says how large it was (the record stays in its input
//! topic at `weir-source` until retention removes it).

use bytes::Bytes;
use weir_core::{cut_text, stored_len, Record};

/// Header names added to a dead letter.
pub(crate) const ERROR_HEADER: &str = "weir-error";
pub(crate) const SOURCE_HEADER: &str = "weir-source";
pub(crate) const OMITTED_HEADER: &str = "weir-value-omitted";

/// The most headers a record may carry (their count is a u16 in the formats).
const MAX_HEADERS: usize = u16::MAX as usize;

/// Builds the dead letter of `record` within `max_bytes` encoded (the broker's record limit).
pub(crate) fn dead_letter(
    record: &Record,
    source: String,
    error: &str,
    max_bytes: usize,
) -> Record {
    let mut headers: Vec<(String, Bytes)> = record.headers.clone();
    // Room for the three headers this may add.
    headers.truncate(MAX_HEADERS - 3);
    headers.push((SOURCE_HEADER.into(), Bytes::from(source.clone())));
    let mut value = record.value.clone();
    let size = |value: &Bytes, headers: &[(String, Bytes)], error_len: usize| {
        stored_len(
            record.key.as_deref(),
            value,
            None,
            headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())),
        ) + 2
            + ERROR_HEADER.len()
            + 4
            + error_len
    };
    if size(&value, &headers, 0) > max_bytes {
        headers.push((
            OMITTED_HEADER.into(),
            Bytes::from(format!(
                "{} bytes: too large to carry with the error; the record is at {source}",
                value.len()
            )),
        ));
        value = Bytes::new();
        if size(&value, &headers, 0) > max_bytes {
            // Its own headers take the room: only ours are kept.
            headers.retain(|(k, _)| k == SOURCE_HEADER || k == OMITTED_HEADER);
        }
    }
    let room = max_bytes.saturating_sub(size(&value, &headers, 0));
    headers.push((ERROR_HEADER.into(), Bytes::from(cut_text(error, room))));
    Record {
        key: record.key.clone(),
        value,
        headers,
        id: None,
        // Stamped with broker time at append.
        timestamp_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value_len: usize, headers: usize) -> Record {
        Record {
            key: Some(Bytes::from_static(b"ann")),
            value: Bytes::from(vec![b'x'; value_len]),
            headers: (0..headers)
                .map(|i| (format!("h{i}"), Bytes::from_static(b"v")))
                .collect(),
            id: Some("order-1".into()),
            timestamp_ms: 42,
        }
    }

    fn header<'a>(r: &'a Record, name: &str) -> Option<&'a [u8]> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn a_small_record_keeps_everything() {
        let r = record(10, 2);
        let d = dead_letter(&r, "in/0@7".into(), "not an amount", 1 << 20);
        assert_eq!(d.value, r.value);
        assert_eq!(d.key, r.key);
        assert_eq!(header(&d, ERROR_HEADER), Some(&b"not an amount"[..]));
        assert_eq!(header(&d, SOURCE_HEADER), Some(&b"in/0@7"[..]));
        assert_eq!(header(&d, "h1"), Some(&b"v"[..]));
        assert!(header(&d, OMITTED_HEADER).is_none());
    }

    #[test]
    fn a_long_error_is_cut_to_fit() {
        let max = 1 << 20;
        let r = record(max - 200, 0);
        let error = "é".repeat(10_000);
        let d = dead_letter(&r, "in/0@7".into(), &error, max);
        assert!(d.encoded_len() <= max, "{} > {max}", d.encoded_len());
        assert_eq!(d.value, r.value, "the value still fits");
        let kept = std::str::from_utf8(header(&d, ERROR_HEADER).unwrap()).unwrap();
        assert!(kept.ends_with('…') && kept.len() < error.len());
    }

    #[test]
    fn a_record_at_the_limit_goes_without_its_value_and_says_so() {
        let max = 1 << 20;
        let r = record(max - 40, 0);
        assert!(r.encoded_len() <= max);
        let d = dead_letter(&r, "in/0@7".into(), "boom", max);
        assert!(d.encoded_len() <= max);
        assert!(d.value.is_empty());
        let omitted = std::str::from_utf8(header(&d, OMITTED_HEADER).unwrap()).unwrap();
        assert!(
            omitted.starts_with(&format!("{} bytes", max - 40)),
            "{omitted}"
        );
        assert_eq!(header(&d, ERROR_HEADER), Some(&b"boom"[..]));
    }

    #[test]
    fn headers_leave_room_for_ours() {
        let r = record(1, u16::MAX as usize);
        let d = dead_letter(&r, "in/0@7".into(), "boom", usize::MAX / 2);
        assert!(d.check_shape().is_ok());
        assert!(header(&d, ERROR_HEADER).is_some() && header(&d, SOURCE_HEADER).is_some());
    }
}
