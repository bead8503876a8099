//! The bytes read from the transport ahead of need.

use embedded_io::{Read, ReadReady};

use super::Session;
use crate::codec;

/// Bytes read from the transport ahead of need: an acknowledgement, or a
/// PUBLISH header with its topic, then comes in one transport read rather
/// than one per field (each a system call on the unix port). At most 255.
const READ_AHEAD_LEN: usize = 32;

/// What was read from the transport but not yet used.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ReadAhead {
    bytes: [u8; READ_AHEAD_LEN],
    start: u8,
    end: u8,
}

impl ReadAhead {
    pub(super) fn buffered(&self) -> &[u8] {
        self.bytes
            .get(usize::from(self.start)..usize::from(self.end))
            .unwrap_or(&[])
    }
}

/// The transport as the session reads it: through its read-ahead bytes.
pub(super) struct Reading<'a, T> {
    pub(super) io: &'a mut T,
    ahead: &'a mut ReadAhead,
}

impl<T: embedded_io::ErrorType> embedded_io::ErrorType for Reading<'_, T> {
    type Error = T::Error;
}

impl<T: Read> Read for Reading<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, T::Error> {
        if self.ahead.buffered().is_empty() {
            if buf.len() >= READ_AHEAD_LEN {
                // Large reads (payloads) go straight to their destination.
                return self.io.read(buf);
            }
            let count = self.io.read(&mut self.ahead.bytes)?;
            self.ahead.start = 0;
            self.ahead.end = u8::try_from(count.min(READ_AHEAD_LEN)).unwrap_or(0);
        }
        let available = self.ahead.buffered();
        let count = available.len().min(buf.len());
        codec::copy(buf, available);
        // count <= READ_AHEAD_LEN, which fits a u8.
        self.ahead.start = self.ahead.start.saturating_add(u8::try_from(count).unwrap_or(0));
        Ok(count)
    }
}

impl<T: ReadReady> ReadReady for Reading<'_, T> {
    fn read_ready(&mut self) -> Result<bool, T::Error> {
        Ok(!self.ahead.buffered().is_empty() || self.io.read_ready()?)
    }
}

impl Session {
    /// Whether bytes already read from the transport wait to be handled:
    /// then the caller must not wait for the transport before
    /// [`Session::receive`].
    pub fn has_input(&self) -> bool {
        !self.read_ahead.buffered().is_empty()
    }

    /// Runs `step` with the transport wrapped in the read-ahead bytes.
    pub(super) fn reading<T, R>(&mut self, io: &mut T, step: impl FnOnce(&mut Self, &mut Reading<'_, T>) -> R) -> R {
        let mut ahead = core::mem::take(&mut self.read_ahead);
        let result = step(self, &mut Reading { io, ahead: &mut ahead });
        self.read_ahead = ahead;
        result
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::{PacketType, QoS, write_ack};
    use crate::session::Event;
    use crate::session::testing::*;

    use embedded_io::{Read, ReadReady, Write};

    /// A transport that counts its reads.
    struct Counting<'a> {
        pipe: &'a mut Pipe,
        reads: usize,
    }

    impl embedded_io::ErrorType for Counting<'_> {
        type Error = embedded_io::ErrorKind;
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
            self.reads += 1;
            self.pipe.read(buf)
        }
    }

    impl ReadReady for Counting<'_> {
        fn read_ready(&mut self) -> Result<bool, Self::Error> {
            self.pipe.read_ready()
        }
    }

    impl Write for Counting<'_> {
        fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
            self.pipe.write(buf)
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    #[test]
    fn packets_are_read_ahead_in_few_transport_reads() {
        let (mut session, mut pipe) = connected(0);
        let ticket = session
            .publish(&mut pipe, 0, "a", b"", QoS::AtLeastOnce, false)
            .unwrap()
            .unwrap();
        pipe.broker_sends(|b| write_ack(&mut VecWriter(b), PacketType::PubAck, ticket.packet_id).unwrap());
        broker_publish(&mut pipe, "topic/x", &[5; 100], QoS::AtMostOnce, 0, false);
        let mut io = Counting {
            pipe: &mut pipe,
            reads: 0,
        };
        assert_eq!(session.receive(&mut io, 1).unwrap(), Event::Completed(ticket));
        assert_eq!(io.reads, 1, "the PUBACK and the start of the PUBLISH came in one read");
        assert!(session.has_input());
        let (topic, payload, _) = read_message(&mut session, &mut io, 2).unwrap();
        assert_eq!((topic.as_str(), payload), ("topic/x", vec![5; 100]));
        // The rest of the payload went straight into the caller's buffer.
        assert_eq!(io.reads, 2);
        assert!(!session.has_input());
    }

    #[test]
    fn read_ahead_bytes_of_a_dead_link_are_dropped() {
        let (mut session, mut pipe) = connected(0);
        pipe.broker_sends(|b| b.extend_from_slice(&[0xd0, 0, 0x30]));
        session.receive(&mut pipe, 1).unwrap();
        assert!(session.has_input());
        session.link_lost();
        assert!(!session.has_input());
    }
}
