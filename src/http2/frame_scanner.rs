//! Follows the frame boundaries of the bytes an HTTP/2 client sends, without
//! parsing more than each 9-byte frame header: the 24-byte connection preface
//! is skipped, then every header's length field says how many payload bytes
//! to skip to the next one. h2 does the real parsing (and rejects what is
//! malformed); this only tells the control-frame budget which frames arrive,
//! as the bytes come, in whatever pieces the socket delivers them.

use std::ops::ControlFlow;

/// Length of the client connection preface (RFC 9113 §3.4).
pub const PREFACE_LEN: usize = 24;
/// Length of a frame header (RFC 9113 §4.1).
pub const HEADER_LEN: usize = 9;

/// A frame header as it arrived (no check that it is valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub length: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream_id: u32,
}

impl FrameHeader {
    fn parse(bytes: &[u8; HEADER_LEN]) -> Self {
        Self {
            length: u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]),
            kind: bytes[3],
            flags: bytes[4],
            stream_id: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    /// Preface bytes still to skip.
    Preface(usize),
    /// Header bytes gathered so far.
    Header([u8; HEADER_LEN], usize),
    /// Payload bytes still to skip.
    Payload(u32),
}

/// Where the scanner is in the client's byte stream.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    state: State,
}

impl Default for FrameScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameScanner {
    /// A scanner at the start of a connection (before the preface).
    pub fn new() -> Self {
        Self {
            state: State::Preface(PREFACE_LEN),
        }
    }

    /// Takes the next `bytes` of the stream and calls `on_frame` with each
    /// frame header they complete. When `on_frame` breaks, scanning stops and
    /// the offset in `bytes` where that frame's header began is returned (0
    /// when it began in an earlier piece); the scanner is then left where it
    /// stopped and should not be fed again.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        mut on_frame: impl FnMut(&FrameHeader) -> ControlFlow<()>,
    ) -> Option<usize> {
        let mut at = 0;
        while at < bytes.len() {
            let rest = &bytes[at..];
            match &mut self.state {
                State::Preface(remaining) => {
                    let skip = (*remaining).min(rest.len());
                    *remaining -= skip;
                    at += skip;
                    if *remaining == 0 {
                        self.state = State::Header([0; HEADER_LEN], 0);
                    }
                }
                State::Header(buf, filled) => {
                    let header_began = at.saturating_sub(*filled);
                    let take = (HEADER_LEN - *filled).min(rest.len());
                    buf[*filled..*filled + take].copy_from_slice(&rest[..take]);
                    *filled += take;
                    at += take;
                    if *filled == HEADER_LEN {
                        let header = FrameHeader::parse(buf);
                        self.state = if header.length == 0 {
                            State::Header([0; HEADER_LEN], 0)
                        } else {
                            State::Payload(header.length)
                        };
                        if on_frame(&header).is_break() {
                            return Some(header_began);
                        }
                    }
                }
                State::Payload(remaining) => {
                    let skip = (*remaining as usize).min(rest.len());
                    *remaining -= skip as u32;
                    at += skip;
                    if *remaining == 0 {
                        self.state = State::Header([0; HEADER_LEN], 0);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let length = payload.len() as u32;
        let mut out = length.to_be_bytes()[1..].to_vec();
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn scan_in_pieces(stream: &[u8], cuts: &[usize]) -> Vec<FrameHeader> {
        let mut scanner = FrameScanner::new();
        let mut seen = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            let cut = cut.clamp(start, stream.len());
            scanner.feed(&stream[start..cut], |header| {
                seen.push(*header);
                ControlFlow::Continue(())
            });
            start = cut;
        }
        seen
    }

    #[test]
    fn skips_the_preface_and_payloads() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        stream.extend(frame(6, 0, 0, b"12345678"));
        stream.extend(frame(1, 5, 1, b"\x82\x86"));
        stream.extend(frame(4, 1, 0, b""));
        let kinds: Vec<(u8, u32)> = scan_in_pieces(&stream, &[])
            .iter()
            .map(|h| (h.kind, h.stream_id))
            .collect();
        assert_eq!(kinds, vec![(4, 0), (6, 0), (1, 1), (4, 0)]);
    }

    #[test]
    fn breaking_reports_where_the_frame_began() {
        let mut stream = vec![0u8; PREFACE_LEN];
        stream.extend(frame(6, 0, 0, b"12345678"));
        stream.extend(frame(6, 0, 0, b"12345678"));
        let second = PREFACE_LEN + HEADER_LEN + 8;
        let mut scanner = FrameScanner::new();
        let mut count = 0;
        let stopped = scanner.feed(&stream, |_| {
            count += 1;
            if count == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(stopped, Some(second));

        // A header split across pieces began before the second piece.
        let mut scanner = FrameScanner::new();
        assert_eq!(
            scanner.feed(&stream[..second + 4], |_| ControlFlow::Continue(())),
            None
        );
        let stopped = scanner.feed(&stream[second + 4..], |_| ControlFlow::Break(()));
        assert_eq!(stopped, Some(0));
    }

    proptest! {
        #[test]
        fn any_split_of_a_frame_stream_gives_the_same_headers(
            frames in proptest::collection::vec((any::<u8>(), any::<u8>(), 0u32..1 << 31, proptest::collection::vec(any::<u8>(), 0..40)), 0..20),
            cuts in proptest::collection::vec(0usize..1200, 0..12),
        ) {
            let mut stream = vec![b'P'; PREFACE_LEN];
            let mut expected = Vec::new();
            for (kind, flags, stream_id, payload) in &frames {
                stream.extend(frame(*kind, *flags, *stream_id, payload));
                expected.push(FrameHeader { length: payload.len() as u32, kind: *kind, flags: *flags, stream_id: *stream_id });
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert_eq!(scan_in_pieces(&stream, &[]), expected.clone());
            prop_assert_eq!(scan_in_pieces(&stream, &cuts), expected);
        }

        #[test]
        fn garbage_never_panics_and_splits_do_not_matter(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(0usize..3000, 0..16),
        ) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert_eq!(scan_in_pieces(&bytes, &[]), scan_in_pieces(&bytes, &cuts));
        }

        #[test]
        fn a_break_points_at_the_header_of_the_frame_it_stopped_on(
            frames in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..30)), 1..12),
            stop_at in 0usize..12,
            cut in 0usize..600,
        ) {
            let mut stream = vec![0u8; PREFACE_LEN];
            let mut starts = Vec::new();
            for (kind, payload) in &frames {
                starts.push(stream.len());
                stream.extend(frame(*kind, 0, 1, payload));
            }
            let stop_at = stop_at % frames.len();
            let cut = cut.min(stream.len());
            let mut scanner = FrameScanner::new();
            let mut count = 0;
            let mut stop = |_: &FrameHeader| {
                count += 1;
                if count > stop_at { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            };
            let first = scanner.feed(&stream[..cut], &mut stop);
            let begin = starts[stop_at];
            match first {
                Some(offset) => prop_assert_eq!(offset, begin),
                None => {
                    let second = scanner.feed(&stream[cut..], &mut stop);
                    prop_assert_eq!(second, Some(begin.saturating_sub(cut)));
                }
            }
        }
    }
}
