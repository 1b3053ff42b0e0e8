//! The `date` header of HTTP/2 responses (hyper adds HTTP/1.1's itself).
//! Formatting a date costs more than the rest of a small response's headers,
//! so each I/O thread formats it once per second and shares the value.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;

thread_local! {
    /// The second last formatted, and its value.
    static CACHED: RefCell<(u64, HeaderValue)> =
        const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
}

/// Now, as an HTTP date ("Sun, 06 Nov 1994 08:49:37 GMT").
pub fn now() -> HeaderValue {
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            // An HTTP date is plain ASCII, always a valid header value.
            cached.1 = HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                .unwrap_or_else(|_| HeaderValue::from_static(""));
            cached.0 = second;
        }
        cached.1.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_an_http_date_of_now() {
        let value = now();
        let parsed = httpdate::parse_http_date(value.to_str().unwrap()).unwrap();
        let drift = SystemTime::now()
            .duration_since(parsed)
            .unwrap_or_default()
            .as_secs();
        assert!(drift <= 2, "{value:?}");
        assert_eq!(value.len(), "Sun, 06 Nov 1994 08:49:37 GMT".len());
    }
}
