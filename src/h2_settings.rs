//! HTTP/2 settings accepted by `Worker.new(h2_settings:)`. HTTP/2 itself lands
//! with the TLS/HTTP2 work; the values are validated now so a bad config fails
//! at boot rather than later.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Settings {
    pub max_concurrent_streams: u32,
    pub initial_window_size: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 100,
            initial_window_size: 65_535,
            max_frame_size: 16_384,
            max_header_list_size: 16 * 1024,
        }
    }
}

/// Names accepted in `h2_settings:`.
pub const H2_SETTING_NAMES: [&str; 4] = [
    "max_concurrent_streams",
    "initial_window_size",
    "max_frame_size",
    "max_header_list_size",
];

impl H2Settings {
    /// Sets one setting, enforcing RFC 9113's ranges. `Err` says what to fix.
    pub fn set(&mut self, name: &str, value: i64) -> Result<(), String> {
        let in_range = |low: i64, high: i64| -> Result<u32, String> {
            if (low..=high).contains(&value) {
                Ok(value as u32)
            } else {
                Err(format!(
                    "h2_settings: {name} must be between {low} and {high}, got {value}"
                ))
            }
        };
        match name {
            "max_concurrent_streams" => self.max_concurrent_streams = in_range(1, u32::MAX as i64)?,
            "initial_window_size" => self.initial_window_size = in_range(0, (1 << 31) - 1)?,
            "max_frame_size" => self.max_frame_size = in_range(16_384, (1 << 24) - 1)?,
            "max_header_list_size" => self.max_header_list_size = in_range(1, u32::MAX as i64)?,
            _ => {
                return Err(format!(
                    "h2_settings: unknown setting {name:?} (known: {})",
                    H2_SETTING_NAMES.join(", ")
                ))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_enforced() {
        let mut s = H2Settings::default();
        assert!(s.set("max_frame_size", 16_383).is_err());
        assert!(s.set("max_frame_size", 1 << 24).is_err());
        s.set("max_frame_size", 32_768).unwrap();
        assert_eq!(s.max_frame_size, 32_768);
        assert!(s.set("initial_window_size", 1 << 31).is_err());
        assert!(s.set("max_concurrent_streams", 0).is_err());
        let err = s.set("bogus", 1).unwrap_err();
        assert!(err.contains("unknown setting"), "{err}");
    }
}
