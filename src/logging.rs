//! Process-wide tracing subscriber. Two layers: log lines on stderr, one per
//! event, at the level HYPERION_LOG sets (off, error, warn, info, debug,
//! trace; default info); and the access log (`crate::access_log`), whose
//! events go to stdout whatever that level is.

use std::sync::Once;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

use crate::access_log::{AccessLayer, TARGET as ACCESS};

static INIT: Once = Once::new();

pub fn init() {
    INIT.call_once(|| {
        let level = std::env::var("HYPERION_LOG")
            .ok()
            .and_then(|value| value.parse::<LevelFilter>().ok())
            .unwrap_or(LevelFilter::INFO);
        let stderr = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(false)
            .with_filter(
                Targets::new()
                    .with_default(level)
                    .with_target(ACCESS, LevelFilter::OFF),
            );
        let access = AccessLayer.with_filter(Targets::new().with_target(ACCESS, LevelFilter::INFO));
        // Another subscriber may already be installed by an embedding program;
        // keeping that one is the right call, so the error is ignored.
        let _ = tracing_subscriber::registry()
            .with(stderr)
            .with(access)
            .try_init();
    });
}
