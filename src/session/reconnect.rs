//! Built-in reconnection: how long to wait before each attempt after a
//! lost link (exponential backoff with "equal jitter"), which failures are
//! worth retrying at that pace, and subscribing again, in turns, when the
//! broker kept no session.
//!
//! The wait before attempt k (counted from 0 since the link was last up
//! long enough) is drawn uniformly from [cap/2, cap], where
//! cap = min(max, min * 2^k): the gaps grow, and stay spread, so that a
//! fleet of devices that lost the same broker does not come back in step.

use embedded_io::Write;

use super::outbound::Stage;
use super::{Error, Session, elapsed};
use crate::codec::v5::SubscriptionOptions;

/// Why the link is down, as far as the wait before the next attempt goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The link was lost, the broker could not be reached, or it did not
    /// answer CONNECT in time: worth trying again soon.
    Link,
    /// The broker answered CONNECT with this refusal (a CONNACK return
    /// code 1-5 in MQTT 3.1.1, a reason code from 0x80 in MQTT 5).
    Refused(u8),
    /// The TLS handshake failed (a certificate that does not verify, say).
    Handshake,
}

/// The refusals after which the broker expects to take the client soon,
/// so that it is retried like a lost link: "server unavailable" (3 in
/// MQTT 3.1.1), and in MQTT 5 "server unavailable", "server busy", "quota
/// exceeded" and "connection rate exceeded".
fn is_transient_refusal(code: u8) -> bool {
    matches!(code, 3 | 0x88 | 0x89 | 0x97 | 0x9f)
}

impl Failure {
    /// Retrying at full pace will not fix a refusal of these credentials or
    /// this identity, nor a certificate that does not verify: such attempts
    /// wait the longest gap from the start. They are still retried, slowly:
    /// an unattended device must come back by itself once the broker's
    /// side is fixed (a policy attached, a certificate renewed).
    fn is_slow(self) -> bool {
        match self {
            Failure::Link => false,
            Failure::Refused(code) => !is_transient_refusal(code),
            Failure::Handshake => true,
        }
    }
}

/// The backoff's state: 16 bytes in the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Backoff {
    min_ms: u32,
    max_ms: u32,
    /// A xorshift generator's state, never 0.
    random: u32,
    /// Attempts since the link was last up long enough (k above).
    attempt: u8,
}

impl Backoff {
    /// A backoff between `min_ms` and `max_ms` (set in order, min at least
    /// 1 ms). `seed` differs from device to device (the binding mixes the
    /// client id and a fast clock into it).
    pub(super) fn new(min_ms: u32, max_ms: u32, seed: u32) -> Self {
        let min_ms = min_ms.max(1);
        Backoff {
            min_ms,
            max_ms: max_ms.max(min_ms),
            random: if seed == 0 { 0x9e37_79b9 } else { seed },
            attempt: 0,
        }
    }

    fn next_random(&mut self) -> u32 {
        let mut x = self.random;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.random = x;
        x
    }

    /// The wait before the next attempt, in milliseconds.
    fn next_delay(&mut self, failure: Failure) -> u32 {
        let cap = if failure.is_slow() {
            self.max_ms
        } else {
            // min * 2^k, without overflow: past 31 doublings it is max anyway.
            self.min_ms
                .checked_shl(u32::from(self.attempt))
                .filter(|cap| cap >> self.attempt == self.min_ms)
                .map_or(self.max_ms, |cap| cap.min(self.max_ms))
        };
        self.attempt = self.attempt.saturating_add(1).min(31);
        let low = cap / 2;
        // cap - low + 1 values, from low to cap (no overflow: low <= cap).
        let spread = cap.saturating_sub(low).saturating_add(1);
        low.saturating_add(self.next_random().checked_rem(spread).unwrap_or(0))
    }
}

/// The caller's subscription table, read one entry at a time when the
/// subscriptions are sent again.
pub trait Filters {
    /// The filter and QoS of entry `index`, or None past the end.
    fn filter(&mut self, index: u16) -> Option<(&str, SubscriptionOptions)>;
}

/// The CONNACK/SUBACK return code of a refused subscription.
const SUBSCRIPTION_REFUSED: u8 = 0x80;

impl Session {
    /// Turns built-in reconnection on: the session then times the attempts
    /// ([`Session::next_attempt_delay`]) and, after a reconnect to a broker
    /// that kept no session, has the subscriptions sent again
    /// ([`Session::resubscribe`]). A `min_ms` of 0 turns it off.
    pub fn set_backoff(&mut self, min_ms: u32, max_ms: u32, seed: u32) {
        self.backoff = (min_ms > 0).then(|| Backoff::new(min_ms, max_ms, seed));
    }

    /// How long to wait before the next attempt to connect, the link being
    /// down for `failure`. A link that stayed up for the longest gap starts
    /// the backoff afresh. 0 when built-in reconnection is off.
    pub fn next_attempt_delay(&mut self, now: u32, failure: Failure) -> u32 {
        let Some(backoff) = self.backoff.as_mut() else {
            return 0;
        };
        if let Some(since) = self.up_since.take()
            && elapsed(now, since) >= backoff.max_ms
        {
            backoff.attempt = 0;
        }
        backoff.next_delay(failure)
    }

    /// The broker accepted the connection at `now`: with built-in
    /// reconnection, the subscriptions are sent again when it kept no
    /// session for them (or when the last resubscription did not finish).
    pub(super) fn accepted(&mut self, now: u32, session_present: bool) {
        self.up_since = Some(now);
        if self.backoff.is_some() && (!session_present || self.resubscribe.is_some()) {
            self.resubscribe = Some(0);
        }
    }

    /// Sends the next subscriptions of the table again, as many as there
    /// are free in-flight slots; the rest go on later calls, as SUBACKs
    /// free the slots. Returns how many resubscriptions the broker refused
    /// since the last call (for the caller to report).
    pub fn resubscribe<W: Write, F: Filters>(&mut self, io: &mut W, now: u32, filters: &mut F) -> Result<u8, Error> {
        let refused = core::mem::take(&mut self.resubscriptions_refused);
        while let Some(next) = self.resubscribe {
            if !self.is_connected() || !self.inflight.iter().any(Option::is_none) {
                break;
            }
            let Some((filter, options)) = filters.filter(next) else {
                self.resubscribe = None;
                break;
            };
            let ticket = self.start_command(now, Stage::AwaitResubAck)?;
            self.write_subscribe(io, ticket.packet_id, filter, options)?;
            self.last_sent = now;
            self.resubscribe = next.checked_add(1);
        }
        Ok(refused)
    }

    /// An entry left the caller's table: the ones after it moved down, so
    /// a resubscription under way starts again from the first (subscribing
    /// again to a filter the broker has already is harmless).
    pub fn table_shrank(&mut self) {
        if self.resubscribe.is_some() {
            self.resubscribe = Some(0);
        }
    }

    /// A SUBACK answered a resubscription: nobody waits for it, so its slot
    /// is free at once; a refusal is counted for the caller to report.
    pub(super) fn resubscribed(&mut self, code: u8) {
        // 0x80 in MQTT 3.1.1; any code from 0x80 up in MQTT 5.
        if code >= SUBSCRIPTION_REFUSED {
            self.resubscriptions_refused = self.resubscriptions_refused.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, Packet, QoS, write_suback};
    use crate::session::testing::*;
    use std::string::String;
    use std::vec::Vec;

    fn caps_of(min: u32, max: u32, failures: &[Failure]) -> Vec<(u32, u32)> {
        let mut backoff = Backoff::new(min, max, 12345);
        failures
            .iter()
            .map(|&failure| {
                let attempt = backoff.attempt;
                let delay = backoff.next_delay(failure);
                (attempt.into(), delay)
            })
            .collect()
    }

    #[test]
    fn each_wait_lies_between_half_the_cap_and_the_cap() {
        let delays = caps_of(250, 4000, &[Failure::Link; 40]);
        for (k, delay) in delays {
            let cap = (250u32 << k.min(5)).min(4000);
            assert!(
                delay >= cap / 2 && delay <= cap,
                "attempt {k}: {delay} outside [{}, {cap}]",
                cap / 2
            );
        }
    }

    #[test]
    fn waits_are_spread_between_devices() {
        let first: Vec<u32> = (1..=20)
            .map(|seed| Backoff::new(1000, 60000, seed).next_delay(Failure::Link))
            .collect();
        let distinct = first.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(distinct > 15, "{first:?}");
    }

    #[test]
    fn a_refusal_waits_the_longest_gap_and_server_unavailable_does_not() {
        let mut backoff = Backoff::new(100, 8000, 7);
        assert!(backoff.next_delay(Failure::Refused(5)) >= 4000);
        assert!(backoff.next_delay(Failure::Handshake) >= 4000);
        // Server unavailable (3.1.1), and MQTT 5's "server busy".
        for code in [3, 0x89] {
            let mut backoff = Backoff::new(100, 8000, 7);
            assert!(backoff.next_delay(Failure::Refused(code)) <= 100);
        }
        // MQTT 5's "not authorized" waits as 3.1.1's does.
        let mut backoff = Backoff::new(100, 8000, 7);
        assert!(backoff.next_delay(Failure::Refused(0x87)) >= 4000);
    }

    #[test]
    fn huge_bounds_do_not_overflow() {
        for (k, delay) in caps_of(u32::MAX / 3, u32::MAX, &[Failure::Link; 40]) {
            assert!(delay >= u32::MAX / 6, "attempt {k}: {delay}");
        }
        assert!(Backoff::new(0, 0, 0).next_delay(Failure::Link) <= 1);
    }

    #[test]
    fn a_min_of_zero_turns_built_in_reconnection_off() {
        let (mut session, _pipe) = connected(0);
        session.set_backoff(100, 1000, 3);
        assert!(session.next_attempt_delay(10, Failure::Link) >= 50);
        session.set_backoff(0, 0, 3);
        assert_eq!(session.next_attempt_delay(20, Failure::Link), 0);
    }

    #[test]
    fn the_backoff_starts_afresh_after_the_link_stayed_up_long_enough() {
        let mut session = Session::new(CONFIG);
        session.set_backoff(100, 1000, 3);
        for _ in 0..6 {
            session.next_attempt_delay(0, Failure::Link);
        }
        assert!(session.next_attempt_delay(0, Failure::Link) >= 500);
        // Up for less than the longest gap: the backoff goes on.
        session.accepted(10_000, true);
        assert!(session.next_attempt_delay(10_500, Failure::Link) >= 500);
        // Up for the longest gap: it starts again.
        session.accepted(20_000, true);
        assert!(session.next_attempt_delay(21_000, Failure::Link) <= 100);
    }

    struct Table(Vec<String>);

    impl Filters for Table {
        fn filter(&mut self, index: u16) -> Option<(&str, SubscriptionOptions)> {
            self.0
                .get(usize::from(index))
                .map(|filter| (filter.as_str(), SubscriptionOptions::qos(QoS::AtLeastOnce)))
        }
    }

    #[test]
    fn more_subscriptions_than_slots_are_sent_again_in_turns() {
        let (mut session, mut pipe) = connected(0);
        session.set_backoff(100, 1000, 1);
        session.accepted(0, false);
        let mut table = Table((0..20).map(|i| std::format!("t/{i}")).collect());
        assert_eq!(session.resubscribe(&mut pipe, 0, &mut table), Ok(0));
        let mut seen = Vec::new();
        for _ in 0..40 {
            let bytes = core::mem::take(&mut pipe.outbound);
            let mut rest = &bytes[..];
            while let Some((packet, used)) = codec::decode(rest).unwrap() {
                rest = &rest[used..];
                let Packet::Subscribe { packet_id, filters } = packet else {
                    panic!("{packet:?}");
                };
                let (filter, _) = filters.iter().next().unwrap();
                seen.push(String::from(filter));
                // The broker refuses the last one.
                let code = if filter == "t/19" { 0x80 } else { 1 };
                pipe.broker_sends(|bytes| write_suback(&mut VecWriter(bytes), packet_id, &[code]).unwrap());
            }
            while session.receive(&mut pipe, 0).unwrap() != crate::session::Event::Nothing {}
            let refused = session.resubscribe(&mut pipe, 0, &mut table).unwrap();
            if seen.len() == 20 && refused == 1 {
                break;
            }
        }
        let expected: Vec<String> = (0..20).map(|i| std::format!("t/{i}")).collect();
        assert_eq!(seen, expected);
        assert!(session.inflight.iter().all(Option::is_none));
        assert_eq!(session.resubscribe, None);
    }

    #[test]
    fn an_entry_removed_meanwhile_makes_the_resubscription_start_again() {
        let (mut session, mut pipe) = connected(0);
        session.set_backoff(100, 1000, 1);
        session.accepted(0, false);
        let mut table = Table((0..12).map(|i| std::format!("t/{i}")).collect());
        session.resubscribe(&mut pipe, 0, &mut table).unwrap();
        assert_eq!(session.resubscribe, Some(8));
        // "t/0" leaves the table: "t/8" is now entry 7, which would be missed.
        table.0.remove(0);
        session.table_shrank();
        assert_eq!(session.resubscribe, Some(0));
        // Nothing to resubscribe: the call changes nothing.
        session.resubscribe = None;
        session.table_shrank();
        assert_eq!(session.resubscribe, None);
    }

    #[test]
    fn nothing_is_sent_again_when_the_broker_kept_the_session_or_reconnection_is_off() {
        let (mut session, mut pipe) = connected(0);
        let mut table = Table(std::vec![String::from("a")]);
        session.accepted(0, false);
        assert_eq!(session.resubscribe(&mut pipe, 0, &mut table), Ok(0));
        session.set_backoff(100, 1000, 1);
        session.accepted(0, true);
        assert_eq!(session.resubscribe(&mut pipe, 0, &mut table), Ok(0));
        assert!(pipe.outbound.is_empty());
    }
}
