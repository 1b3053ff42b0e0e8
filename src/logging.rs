//! Process-wide tracing subscriber: one line per event on stderr. The level
//! comes from HYPERION_LOG (off, error, warn, info, debug, trace; default info).

use std::sync::Once;

use tracing_subscriber::filter::LevelFilter;

static INIT: Once = Once::new();

pub fn init() {
    INIT.call_once(|| {
        let level = std::env::var("HYPERION_LOG")
            .ok()
            .and_then(|value| value.parse::<LevelFilter>().ok())
            .unwrap_or(LevelFilter::INFO);
        // Another subscriber may already be installed by an embedding program;
        // keeping that one is the right call, so the error is ignored.
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(level)
            .with_target(false)
            .with_ansi(false)
            .try_init();
    });
}
