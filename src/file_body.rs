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

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::{Bytes, BytesMut};

/// How much is read per data frame.
pub const CHUNK: usize = 128 * 1024;

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

    /// The next chunk, or `None` at the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let want = self.remaining.min(CHUNK as u64) as usize;
        let mut buffer = BytesMut::zeroed(want);
        let read = self.file.read_at(&mut buffer, self.offset)?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being sent",
            ));
        }
        buffer.truncate(read);
        self.offset += read as u64;
        self.remaining -= read as u64;
        Ok(Some(buffer.freeze()))
    }
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
    fn refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileBody::open(dir.path()).is_err());
        assert!(FileBody::open(&dir.path().join("missing")).is_err());
    }
}
