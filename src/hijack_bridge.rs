//! Carries a hijacked connection that cannot be handed to the app as it is
//! (TLS, or bytes already read past the request) between the client and
//! the app's end of a socketpair: the app gets a real descriptor with plain
//! (decrypted) bytes, as nio4r and EventMachine need, and Rust does the
//! TLS.
//!
//! - The bytes read past the request reach the app first.
//! - A half-close passes on: EOF from one side shuts down writing to the
//!   other (under TLS: close_notify, then FIN).
//! - An error on either side ends the bridge, closing both.
//! - The bridge ends once both directions are done, or as soon as the app
//!   has closed its end wholly (`IO#close`, not just `close_write`): a client
//!   that never closes cannot keep a connection nobody owns alive.
//!
//! A bridge runs on a task of its own, outside the connection counts: it is
//! the app's connection, with no Hyperion timeout. It holds two 8 KiB
//! buffers while it lives.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest, Ready};
use tokio::net::UnixStream;

use crate::takeover::ConnectionStream;

/// Bytes moved per read, in each direction.
const BUFFER: usize = 8 * 1024;

/// Bridges `client` and `app` (our end of the app's socketpair) until the
/// connection is over; `leftover` goes to the app first.
pub async fn run(client: Box<dyn ConnectionStream>, leftover: Bytes, app: UnixStream) {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    // The app's end is used through `&UnixStream` from both directions and
    // the close watch at once, so none of them owns it.
    let app = &app;
    let upstream = async {
        write_app(app, &leftover).await?;
        drop(leftover);
        let mut buffer = vec![0u8; BUFFER];
        loop {
            let n = client_read.read(&mut buffer).await?;
            if n == 0 {
                return socket2::SockRef::from(app).shutdown(std::net::Shutdown::Write);
            }
            write_app(app, &buffer[..n]).await?;
        }
    };
    let downstream = async {
        let mut buffer = vec![0u8; BUFFER];
        loop {
            let n = read_app(app, &mut buffer).await?;
            if n == 0 {
                return client_write.shutdown().await;
            }
            client_write.write_all(&buffer[..n]).await?;
            client_write.flush().await?;
        }
    };
    // Polled only once the app has stopped writing: before that, its reads
    // and writes say all there is to say.
    let app_closed = wait_closed(app.as_fd());
    tokio::pin!(upstream, downstream, app_closed);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            done = &mut upstream, if !up_done => match done {
                Ok(()) => up_done = true,
                Err(e) => return tracing::debug!(error = %e, "hijack bridge: client side ended"),
            },
            done = &mut downstream, if !down_done => match done {
                Ok(()) => down_done = true,
                Err(e) => return tracing::debug!(error = %e, "hijack bridge: app side ended"),
            },
            () = &mut app_closed, if down_done => return,
        }
        if up_done && down_done {
            return;
        }
    }
}

/// Reads from the app's end (0 at EOF).
async fn read_app(app: &UnixStream, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        app.readable().await?;
        match app.try_read(buffer) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
    }
}

/// Writes all of `data` to the app's end.
async fn write_app(app: &UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        app.writable().await?;
        match app.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Resolves once the socket's peer has closed it wholly (the kernel reports
/// HUP), not just shut down its writing side. Watches its own registration
/// of a duplicate descriptor, so clearing readiness here never stalls the
/// bridge's own reads and writes.
async fn wait_closed(socket: BorrowedFd<'_>) {
    let registered = socket.try_clone_to_owned().and_then(|fd| {
        // SAFETY: the AsyncFd owns this duplicate descriptor, so it stays
        // open and the same for the AsyncFd's whole life.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
            .map_err(|e| e.into())
    });
    let watch = match registered {
        Ok(watch) => watch,
        Err(e) => {
            tracing::debug!(error = %e, "hijack bridge: cannot watch the app's socket");
            return std::future::pending().await;
        }
    };
    loop {
        let Ok(mut ready) = watch.ready(Interest::WRITABLE).await else {
            return;
        };
        if ready.ready().is_write_closed() {
            return;
        }
        // Wait for the next change (the close, or the app reading).
        ready.clear_ready_matching(Ready::WRITABLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LONG: Duration = Duration::from_secs(10);

    /// The client as a duplex pipe, the app as a socketpair end; the bridge
    /// runs between them.
    fn bridged(leftover: &'static [u8]) -> (tokio::io::DuplexStream, UnixStream) {
        let (client, app, _bridge) = bridged_task(leftover);
        (client, app)
    }

    fn bridged_task(
        leftover: &'static [u8],
    ) -> (
        tokio::io::DuplexStream,
        UnixStream,
        tokio::task::JoinHandle<()>,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (ours, app) = UnixStream::pair().unwrap();
        let bridge = tokio::spawn(run(Box::new(server), Bytes::from_static(leftover), ours));
        (client, app, bridge)
    }

    #[tokio::test]
    async fn leftover_bytes_come_first_then_both_directions_flow() {
        let (mut client, mut app) = bridged(b"early ");
        client.write_all(b"later").await.unwrap();
        let mut got = [0u8; 11];
        tokio::time::timeout(LONG, app.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"early later");
        app.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 6];
        tokio::time::timeout(LONG, client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"answer");
    }

    #[tokio::test]
    async fn a_half_close_passes_on_and_the_other_direction_goes_on() {
        let (mut client, mut app) = bridged(b"");
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(LONG, app.read_to_end(&mut rest))
            .await
            .expect("the app sees EOF")
            .unwrap();
        assert!(rest.is_empty());
        app.write_all(b"still here").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(LONG, client.read_to_end(&mut got))
            .await
            .expect("the client sees the data, then EOF")
            .unwrap();
        assert_eq!(got, b"still here");
    }

    #[tokio::test]
    async fn the_app_closing_its_end_ends_the_bridge_though_the_client_stays_silent() {
        let (mut client, app, bridge) = bridged_task(b"");
        drop(app);
        let mut got = Vec::new();
        tokio::time::timeout(LONG, client.read_to_end(&mut got))
            .await
            .expect("EOF passes on")
            .unwrap();
        assert!(got.is_empty());
        // The client neither writes nor closes: only the app's close (seen
        // as HUP on its end) can end the bridge.
        tokio::time::timeout(LONG, bridge)
            .await
            .expect("the bridge still holds a connection nobody owns")
            .unwrap();
        assert!(
            client.write_all(b"x").await.is_err(),
            "the client's connection is closed"
        );
    }

    #[tokio::test]
    async fn the_app_shutting_down_writing_only_keeps_the_client_side_open() {
        let (mut client, mut app) = bridged(b"");
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(LONG, client.read_to_end(&mut got))
            .await
            .expect("EOF passes on")
            .unwrap();
        client.write_all(b"after").await.unwrap();
        let mut got = [0u8; 5];
        tokio::time::timeout(LONG, app.read_exact(&mut got))
            .await
            .expect("the client's bytes still reach the app")
            .unwrap();
        assert_eq!(&got, b"after");
    }
}
