//! Listening sockets: bound here with SO_REUSEPORT (so sibling workers share a
//! port and the kernel balances), or adopted from a Ruby TCPServer/UNIXServer.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::error::Error;

/// Pending-connection backlog for sockets we bind (Puma uses 1024 too).
const BACKLOG: i32 = 1024;

#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Where a listener is bound, for logs and for the Rack env fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    Tcp(SocketAddr),
    Unix(String),
}

impl BoundAddr {
    /// Host as it appears in a URL or SERVER_NAME (IPv6 in brackets).
    pub fn host(&self) -> String {
        match self {
            BoundAddr::Tcp(SocketAddr::V4(a)) => a.ip().to_string(),
            BoundAddr::Tcp(SocketAddr::V6(a)) => format!("[{}]", a.ip()),
            BoundAddr::Unix(_) => "localhost".to_owned(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            BoundAddr::Tcp(a) => a.port(),
            BoundAddr::Unix(_) => 0,
        }
    }

    pub fn url(&self, scheme: &str) -> String {
        match self {
            BoundAddr::Tcp(_) => format!("{scheme}://{}:{}", self.host(), self.port()),
            BoundAddr::Unix(path) => format!("unix://{path}"),
        }
    }
}

impl Listener {
    /// Binds `host:port` with SO_REUSEADDR and SO_REUSEPORT. Tries each
    /// address the host resolves to and reports the last failure.
    pub fn bind_reuseport(host: &str, port: u16) -> Result<Listener, Error> {
        let bracketless = host.trim_start_matches('[').trim_end_matches(']');
        let display = if bracketless.contains(':') {
            format!("[{bracketless}]:{port}")
        } else {
            format!("{bracketless}:{port}")
        };
        let bind_error = |source| Error::Bind {
            address: display.clone(),
            source,
        };
        let addresses = (bracketless, port).to_socket_addrs().map_err(bind_error)?;
        let mut last_error = io::Error::new(io::ErrorKind::NotFound, "host resolved to no address");
        for address in addresses {
            match bind_one(address) {
                Ok(listener) => return Ok(Listener::Tcp(listener)),
                Err(e) => last_error = e,
            }
        }
        Err(bind_error(last_error))
    }

    /// Adopts a listening socket owned by Ruby. The descriptor is duplicated,
    /// so closing the Ruby object later does not pull the socket from under us.
    pub fn adopt(fd: RawFd) -> Result<Listener, Error> {
        // SAFETY: the caller passes the fd of a live Ruby IO object, which stays
        // open for the duration of this call; we only borrow it to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let accepting = getsockopt(&borrowed, sockopt::AcceptConn)
            .map_err(|e| Error::Listener(format!("fd {fd} is not a socket ({e})")))?;
        if !accepting {
            return Err(Error::Listener(format!(
                "fd {fd} is a socket that is not listening (call listen first, or pass a TCPServer/UNIXServer)"
            )));
        }
        let owned: OwnedFd = borrowed
            .try_clone_to_owned()
            .map_err(|e| Error::Listener(format!("could not duplicate fd {fd}: {e}")))?;
        let socket = Socket::from(owned);
        let local = socket
            .local_addr()
            .map_err(|e| Error::Listener(format!("fd {fd}: {e}")))?;
        if local.is_unix() {
            Ok(Listener::Unix(UnixListener::from(OwnedFd::from(socket))))
        } else if local.as_socket().is_some() {
            Ok(Listener::Tcp(TcpListener::from(socket)))
        } else {
            Err(Error::Listener(format!(
                "fd {fd} is neither a TCP nor a unix socket"
            )))
        }
    }

    pub fn local_addr(&self) -> io::Result<BoundAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(BoundAddr::Tcp),
            Listener::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr
                    .as_pathname()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                Ok(BoundAddr::Unix(path))
            }
        }
    }

    /// Registers the socket with the current tokio runtime.
    pub(crate) fn into_async(self) -> io::Result<AsyncListener> {
        match self {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                Ok(AsyncListener::Tcp(tokio::net::TcpListener::from_std(l)?))
            }
            Listener::Unix(l) => {
                l.set_nonblocking(true)?;
                Ok(AsyncListener::Unix(tokio::net::UnixListener::from_std(l)?))
            }
        }
    }
}

fn bind_one(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

pub(crate) enum AsyncListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn two_reuseport_listeners_share_a_port() {
        let first = Listener::bind_reuseport("127.0.0.1", 0).unwrap();
        let port = first.local_addr().unwrap().port();
        let second = Listener::bind_reuseport("127.0.0.1", port).unwrap();
        assert_eq!(second.local_addr().unwrap().port(), port);
    }

    #[test]
    fn bind_error_names_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = Listener::bind_reuseport("127.0.0.1", port).unwrap_err();
        assert!(err.is_bind());
        assert_eq!(
            err.to_string(),
            format!("could not bind 127.0.0.1:{port}: address already in use")
        );
    }

    #[test]
    fn adopt_accepts_listeners_and_refuses_other_fds() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let adopted = Listener::adopt(tcp.as_raw_fd()).unwrap();
        assert_eq!(
            adopted.local_addr().unwrap(),
            BoundAddr::Tcp(tcp.local_addr().unwrap())
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let unix = UnixListener::bind(&path).unwrap();
        assert!(matches!(
            Listener::adopt(unix.as_raw_fd()).unwrap(),
            Listener::Unix(_)
        ));

        let file = tempfile::tempfile().unwrap();
        assert!(Listener::adopt(file.as_raw_fd()).is_err());
        let unlistened = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let err = Listener::adopt(unlistened.as_raw_fd()).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
    }

    #[test]
    fn urls() {
        let v6: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(BoundAddr::Tcp(v6).url("http"), "http://[::1]:8080");
    }
}
