//! `rack.hijack` on the tokio side: the takeover job that gives a
//! connection to the app.
//!
//! The app gets a real descriptor (ActionCable registers it with nio4r,
//! faye-websocket attaches it to EventMachine):
//!
//! - a plain TCP or Unix socket with nothing read past the request is handed
//!   over as it is: the app's IO is the client's socket, with no copy in
//!   between and nothing of Hyperion left on the connection;
//! - otherwise (TLS, or bytes already read past the request, such as a first
//!   WebSocket frame sent right behind the handshake) the app gets one end
//!   of a socketpair, and `hijack_bridge` carries bytes between it and the
//!   client, decrypting under TLS and delivering the early bytes first.
//!   Putting the early bytes back into the kernel's receive queue is not
//!   possible, and giving the app a Ruby object that replays them first
//!   would not be a real descriptor for nio4r or EventMachine.

use std::io;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use crate::takeover::{AfterTakeover, HandedSocket, JobFuture, SocketKind, Taken, TakeoverJob};

/// What the requester gets: the app's socket, or why there is none.
pub type HandOverResult = io::Result<HandedSocket>;

/// Gives the connection to the app, after writing `head` (a partial hijack's
/// status and headers; empty for a full hijack).
pub struct HandOver {
    head: Bytes,
    reply: oneshot::Sender<HandOverResult>,
}

impl HandOver {
    /// The job, and where its socket arrives. The receiver sees an error
    /// (the sender dropped) if the connection ends before the job runs.
    pub fn new(head: Bytes) -> (Box<Self>, oneshot::Receiver<HandOverResult>) {
        let (reply, socket) = oneshot::channel();
        (Box::new(Self { head, reply }), socket)
    }
}

impl TakeoverJob for HandOver {
    fn run(self: Box<Self>, taken: Taken) -> JobFuture {
        Box::pin(async move {
            let HandOver { head, reply } = *self;
            // The receiver may be gone (the Ruby thread was interrupted):
            // the socket is then dropped, which closes the connection.
            let _ = reply.send(hand_over(head, taken).await);
            AfterTakeover::Released
        })
    }
}

async fn hand_over(head: Bytes, taken: Taken) -> HandOverResult {
    let Taken {
        mut stream,
        leftover,
        write_timeout,
    } = taken;
    if !head.is_empty() {
        let written = tokio::time::timeout(write_timeout, async {
            stream.write_all(&head).await?;
            stream.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client accepted no response bytes within write_timeout",
                ))
            }
        }
    }
    let stream = if leftover.is_empty() {
        match stream.into_socket() {
            Ok(socket) => return socket,
            Err(stream) => stream,
        }
    } else {
        stream
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    theirs.set_nonblocking(true)?;
    let ours = tokio::net::UnixStream::from_std(ours)?;
    tokio::spawn(crate::hijack_bridge::run(stream, leftover, ours));
    Ok(HandedSocket {
        fd: theirs.into(),
        kind: SocketKind::Unix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    fn taken(stream: Box<dyn crate::takeover::ConnectionStream>, leftover: &'static [u8]) -> Taken {
        Taken {
            stream,
            leftover: Bytes::from_static(leftover),
            write_timeout: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn a_plain_socket_with_nothing_read_ahead_is_handed_over_as_it_is() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let local = server.local_addr().unwrap();
        let (job, socket) = HandOver::new(Bytes::from_static(
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ));
        assert!(matches!(
            job.run(taken(Box::new(server), b"")).await,
            AfterTakeover::Released
        ));
        let handed = socket.await.unwrap().unwrap();
        assert_eq!(handed.kind, SocketKind::Tcp);
        let socket = std::net::TcpStream::from(handed.fd);
        assert_eq!(
            socket.local_addr().unwrap(),
            local,
            "the client's own socket"
        );
        let mut head = [0u8; 36];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
    }

    #[tokio::test]
    async fn bytes_read_ahead_reach_the_app_first_through_a_socketpair() {
        let (mut client, server) = tokio::io::duplex(4096);
        let (job, socket) = HandOver::new(Bytes::new());
        job.run(taken(Box::new(server), b"first frame")).await;
        let handed = socket.await.unwrap().unwrap();
        assert_eq!(handed.kind, SocketKind::Unix);
        // Already non-blocking, as tokio needs.
        let app = std::os::unix::net::UnixStream::from(handed.fd);
        let mut app = tokio::net::UnixStream::from_std(app).unwrap();
        client.write_all(b", then more").await.unwrap();
        let mut got = [0u8; 22];
        tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"first frame, then more");
    }
}
