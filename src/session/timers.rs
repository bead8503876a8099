//! Keepalive and the CONNECT deadline, on the caller's millisecond clock.

use embedded_io::Write;

use super::{Error, Link, Session, elapsed};
use crate::codec::{self, PacketType};

impl Session {
    /// How long the broker has to answer PINGREQ: half a keepalive period,
    /// so that a dead link is noticed within 1.5 periods of silence.
    fn ping_patience(&self) -> u32 {
        (self.keepalive_ms / 2).min(self.config.command_timeout_ms).max(1)
    }

    /// How long the link has been quiet in either direction. Pinging when
    /// nothing came in for a keepalive period, too, finds a dead link even
    /// while the application keeps publishing.
    fn idle_for(&self, now: u32) -> u32 {
        elapsed(now, self.last_sent).max(elapsed(now, self.last_received))
    }

    /// Milliseconds until [`Session::tick`] has work to do (a PINGREQ to
    /// send, an answer overdue), at most `limit`: how long a caller may wait
    /// for input before it should tick again.
    pub fn next_timer(&self, now: u32, limit: u32) -> u32 {
        let until = |since: u32, period: u32| period.saturating_sub(elapsed(now, since));
        let due = match self.link {
            Link::Down => limit,
            Link::AwaitingConnAck { since } => until(since, self.config.command_timeout_ms),
            Link::Up if self.keepalive_ms == 0 => limit,
            Link::Up => match self.ping_sent {
                Some(sent) => until(sent, self.ping_patience()),
                None => until(self.last_sent, self.keepalive_ms).min(until(self.last_received, self.keepalive_ms)),
            },
        };
        due.min(limit)
    }

    /// Runs the timers: sends PINGREQ when nothing was sent, or nothing
    /// received, for the keepalive period, and fails when the broker does
    /// not answer it, or CONNECT, in time.
    pub fn tick<W: Write>(&mut self, io: &mut W, now: u32) -> Result<(), Error> {
        match self.link {
            Link::Down => Ok(()),
            Link::AwaitingConnAck { since } => {
                if elapsed(now, since) >= self.config.command_timeout_ms {
                    Err(Error::ConnectTimeout)
                } else {
                    Ok(())
                }
            }
            Link::Up if self.keepalive_ms == 0 => Ok(()),
            Link::Up => {
                if let Some(sent) = self.ping_sent {
                    // Half a keepalive period for the answer: a dead link is
                    // noticed within 1.5 keepalive periods of silence.
                    if elapsed(now, sent) >= self.ping_patience() {
                        return Err(Error::PingTimeout);
                    }
                } else if self.idle_for(now) >= self.keepalive_ms {
                    codec::write_empty(io, PacketType::PingReq)?;
                    self.ping_sent = Some(now);
                    self.last_sent = now;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::{PacketType, QoS, write_empty};
    use crate::session::Error;
    use crate::session::testing::*;

    #[test]
    fn keepalive_pings_and_detects_a_dead_broker() {
        let (mut session, mut pipe) = connected(10);
        session.tick(&mut pipe, 9_999).unwrap();
        assert!(pipe.take_sent().is_empty());
        session.tick(&mut pipe, 10_001).unwrap();
        assert_eq!(pipe.take_sent(), ["PingReq"]);
        pipe.broker_sends(|b| write_empty(&mut VecWriter(b), PacketType::PingResp).unwrap());
        session.receive(&mut pipe, 10_002).unwrap();
        session.tick(&mut pipe, 15_000).unwrap();
        assert!(pipe.take_sent().is_empty(), "the ping reset the idle timer");
        session.tick(&mut pipe, 20_001).unwrap();
        assert_eq!(pipe.take_sent(), ["PingReq"]);
        // No PINGRESP: half a keepalive later (capped by the command
        // timeout of 1 s here) the link is declared dead.
        assert_eq!(session.tick(&mut pipe, 20_500), Ok(()));
        assert_eq!(session.tick(&mut pipe, 21_001), Err(Error::PingTimeout));
    }

    #[test]
    fn next_timer_tells_when_to_tick() {
        let (mut session, mut pipe) = connected(10);
        assert_eq!(session.next_timer(1, 500), 500);
        assert_eq!(session.next_timer(9_801, 500), 200);
        assert_eq!(session.next_timer(10_001, 500), 0);
        session.tick(&mut pipe, 10_001).unwrap();
        // Waiting for PINGRESP: the command timeout (1 s) caps the patience.
        assert_eq!(session.next_timer(10_401, 5_000), 600);
        session.link_lost();
        assert_eq!(session.next_timer(10_400, 5_000), 5_000);
        let (session, _) = connected(0);
        assert_eq!(session.next_timer(123, 700), 700);
    }

    #[test]
    fn keepalive_pings_while_only_receiving() {
        let (mut session, mut pipe) = connected(1);
        let mut pings = 0;
        for now in (100..5_000).step_by(100) {
            broker_publish(&mut pipe, "t", b"", QoS::AtMostOnce, 0, false);
            read_message(&mut session, &mut pipe, now);
            session.tick(&mut pipe, now).unwrap();
            if let Some(packet) = pipe.take_sent().first() {
                assert_eq!(packet, "PingReq");
                pings += 1;
                pipe.broker_sends(|b| write_empty(&mut VecWriter(b), PacketType::PingResp).unwrap());
                session.receive(&mut pipe, now).unwrap();
            }
        }
        assert_eq!(pings, 4, "one ping per second of not sending");
    }

    #[test]
    fn keepalive_pings_while_only_sending_and_finds_the_dead_link() {
        let (mut session, mut pipe) = connected(2);
        // The application publishes every 100 ms; the broker is silent.
        let mut failed_at = None;
        for now in (100..10_000).step_by(100) {
            session
                .publish(&mut pipe, now, "t", b"", QoS::AtMostOnce, false)
                .unwrap();
            if session.tick(&mut pipe, now).is_err() {
                failed_at = Some(now);
                break;
            }
        }
        assert!(pipe.take_sent().iter().any(|packet| packet == "PingReq"));
        // Last packet received at 1 ms: ping at 2 s, dead 1 s later.
        assert_eq!(failed_at, Some(3_100));
    }

    #[test]
    fn clock_wraps() {
        let (mut session, mut pipe) = connected(10);
        session.last_sent = u32::MAX - 100;
        session.tick(&mut pipe, 5_000).unwrap();
        assert!(pipe.take_sent().is_empty());
        session.tick(&mut pipe, 9_900).unwrap();
        assert_eq!(pipe.take_sent(), ["PingReq"]);
    }
}
