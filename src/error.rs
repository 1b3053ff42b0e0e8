//! The core's one error type. `ruby/errors.rs` maps it to the exception
//! classes defined in `lib/hyperion/errors.rb`.

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum Error {
    /// The listening address could not be bound.
    Bind { address: String, source: io::Error },
    /// A `listener:` handed in from Ruby is not a usable listening socket.
    Listener(String),
    /// The I/O runtime could not be started.
    Runtime(io::Error),
    /// TLS files or settings that cannot work (the message says which).
    Tls(String),
}

impl Error {
    pub fn is_bind(&self) -> bool {
        matches!(self, Error::Bind { .. })
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Error::Tls(_))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { address, source } => {
                let reason = match source.kind() {
                    io::ErrorKind::AddrInUse => "address already in use".to_owned(),
                    io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
                    io::ErrorKind::AddrNotAvailable => "address not available here".to_owned(),
                    _ => source.to_string(),
                };
                write!(f, "could not bind {address}: {reason}")
            }
            Error::Listener(why) => write!(f, "listener: {why}"),
            Error::Runtime(source) => write!(f, "could not start the I/O runtime: {source}"),
            Error::Tls(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } | Error::Runtime(source) => Some(source),
            Error::Listener(_) | Error::Tls(_) => None,
        }
    }
}
