//! A response body read from a file by the I/O side, for Rack bodies that
//! answer `to_path` (Rack::Files, Rails `send_file`): the Ruby thread hands
//! over the open file and is free at once, instead of reading it through
//! Ruby in 8 KiB Strings and waiting for a slow client.
//!
//! The file is read with positioned reads (`pread`) of `CHUNK` bytes as
//! hyper asks for more, on the I/O thread: files served this way are
//! expected to sit in the page cache, where a read is a memory copy. Reading
//! stops at the length taken when the file was opened, so a file that grows
//! meanwhile does not change the response; one that shrinks ends it as
//! aborted (the client sees a broken response, never a short one that looks
//! complete).
//!
//! On a plain HTTP/1.x connection a large file skips the read loop: it goes
//! from the page cache to the socket with sendfile(2) (`sendfile_to`,
//! driven by `crate::sendfile`), with the same length and shrink rules.
//!
//! The read buffers come from a small pool and go back to it when hyper
//! drops them: a fresh 128 KiB buffer per chunk is an mmap, page faults,
//! zeroing and an munmap each time (a third of the I/O thread's time in a
//! profile of file_1m.ru before the pool).

use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use std::sync::Mutex;

use bytes::Bytes;
use nix::libc;

/// How much is read per data frame.
pub const CHUNK: usize = 128 * 1024;

/// The most one sendfile(2) call is asked for (Linux moves at most this
/// much per call anyway; a non-blocking socket takes what fits its buffer).
const MAX_SENDFILE: u64 = 0x7fff_f000;

/// Buffers kept for reuse (4 MiB at most).
const POOLED: usize = 32;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A read buffer of `CHUNK` initialised bytes (zeroed once, when first
/// made), `filled` of them holding data; it returns to the pool when dropped.
struct PooledBuffer {
    buffer: Vec<u8>,
    filled: usize,
}

impl PooledBuffer {
    fn take() -> Self {
        let buffer = POOL
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0; CHUNK]);
        Self { buffer, filled: 0 }
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buffer[..self.filled]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.buffer);
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOLED {
            pool.push(buffer);
        }
    }
}

#[derive(Debug)]
pub struct FileBody {
    file: File,
    offset: u64,
    remaining: u64,
}

impl FileBody {
    /// Opens a regular file; its current size is the body's length.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(Self {
            file,
            offset: 0,
            remaining: metadata.len(),
        })
    }

    /// Bytes still to send.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Sends the next bytes straight from the file to `socket` with
    /// sendfile(2) (as many as the socket takes at once); returns how many.
    /// `WouldBlock` when the socket is full. The end of the file before the
    /// length taken at open is an error, as in `next_chunk`.
    pub fn sendfile_to(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let mut offset = libc::off_t::try_from(self.offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        let count = self.remaining.min(MAX_SENDFILE) as usize;
        let sent = nix::sys::sendfile::sendfile(socket, &self.file, Some(&mut offset), count)
            .map_err(io::Error::from)?;
        if sent == 0 {
            return Err(shrank());
        }
        self.offset += sent as u64;
        self.remaining -= sent as u64;
        Ok(sent)
    }

    /// The next chunk, or `None` at the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let want = self.remaining.min(CHUNK as u64) as usize;
        let mut pooled = PooledBuffer::take();
        let read = self.file.read_at(&mut pooled.buffer[..want], self.offset)?;
        if read == 0 {
            return Err(shrank());
        }
        pooled.filled = read;
        self.offset += read as u64;
        self.remaining -= read as u64;
        Ok(Some(Bytes::from_owner(pooled)))
    }
}

fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file shrank while it was being sent",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_the_length_it_opened_with_in_chunks() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..(CHUNK * 2 + 100)).map(|i| (i % 251) as u8).collect();
        file.write_all(&content).unwrap();
        let mut body = FileBody::open(file.path()).unwrap();
        assert_eq!(body.remaining(), content.len() as u64);
        // Growing the file now does not change the response.
        file.write_all(b"more").unwrap();
        let mut read = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = body.next_chunk().unwrap() {
            assert!(chunk.len() <= CHUNK);
            read.extend_from_slice(&chunk);
            chunks += 1;
        }
        assert_eq!(read, content);
        assert_eq!(chunks, 3);
    }

    #[test]
    fn a_file_that_shrinks_fails_instead_of_ending_short() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&vec![b'x'; CHUNK + 10]).unwrap();
        let mut body = FileBody::open(file.path()).unwrap();
        file.as_file().set_len(10).unwrap();
        assert_eq!(body.next_chunk().unwrap().unwrap().len(), 10);
        assert!(body.next_chunk().is_err());
    }

    #[test]
    fn sendfile_sends_the_length_it_opened_with_and_fails_when_the_file_shrinks() {
        use std::io::Read;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..(CHUNK * 3 + 7)).map(|i| (i % 253) as u8).collect();
        file.write_all(&content).unwrap();
        let mut body = FileBody::open(file.path()).unwrap();
        file.write_all(b"grown later").unwrap();
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).unwrap();
            got
        });
        while body.remaining() > 0 {
            use std::os::fd::AsFd;
            body.sendfile_to(ours.as_fd()).unwrap();
        }
        drop(ours);
        assert_eq!(reader.join().unwrap(), content);

        let mut body = FileBody::open(file.path()).unwrap();
        file.as_file().set_len(10).unwrap();
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        assert_eq!(body.sendfile_to(ours.as_fd()).unwrap(), 10);
        assert_eq!(
            body.sendfile_to(ours.as_fd()).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileBody::open(dir.path()).is_err());
        assert!(FileBody::open(&dir.path().join("missing")).is_err());
    }
}
