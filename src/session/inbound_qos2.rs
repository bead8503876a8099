//! The packet ids of received QoS 2 messages not yet released.

/// How many inbound QoS 2 packet ids are remembered until their PUBREL.
///
/// MQTT 3.1.1 gives the client no way to limit how many QoS 2 messages a
/// broker sends before releasing them (mosquitto sends 20, EMQX 32). When
/// more are pending, the oldest id is forgotten: its PUBREL normally
/// follows soon, and forgetting it risks a duplicate delivery only if the
/// broker also sends that message again after a lost link.
pub const INBOUND_QOS2_MAX: usize = 32;

/// The packet ids of the QoS 2 messages received and not yet released
/// (PUBREL), oldest first, at most [`INBOUND_QOS2_MAX`]: when full,
/// remembering one more forgets the oldest.
#[derive(Debug)]
pub(super) struct RecentIds {
    ids: [u16; INBOUND_QOS2_MAX],
    len: u8,
}

impl RecentIds {
    pub(super) const fn new() -> Self {
        RecentIds {
            ids: [0; INBOUND_QOS2_MAX],
            len: 0,
        }
    }

    fn known(&self) -> &[u16] {
        self.ids.get(..usize::from(self.len)).unwrap_or(&[])
    }

    // Not `slice::contains`, which on thumbv6m unrolls into 78 more bytes.
    #[allow(clippy::manual_contains)]
    pub(super) fn contains(&self, id: u16) -> bool {
        self.known().iter().any(|&known| known == id)
    }

    pub(super) fn remember(&mut self, id: u16) {
        if usize::from(self.len) == INBOUND_QOS2_MAX {
            self.remove_at(0);
        }
        if let Some(place) = self.ids.get_mut(usize::from(self.len)) {
            *place = id;
            self.len = self.len.saturating_add(1);
        }
    }

    pub(super) fn forget(&mut self, id: u16) {
        if let Some(index) = self.known().iter().position(|&known| known == id) {
            self.remove_at(index);
        }
    }

    /// Removes the id at `index`, moving the younger ones down one place.
    /// (By hand: `Vec::remove` and `rotate_left` bring panic code along.)
    fn remove_at(&mut self, index: usize) {
        let mut earlier: Option<&mut u16> = None;
        for slot in self.ids.get_mut(index..usize::from(self.len)).unwrap_or(&mut []) {
            if let Some(earlier) = earlier {
                *earlier = *slot;
            }
            earlier = Some(slot);
        }
        self.len = self.len.saturating_sub(1);
    }

    pub(super) fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::{INBOUND_QOS2_MAX, RecentIds};

    #[test]
    fn forgets_the_oldest_only_when_full() {
        let mut ids = RecentIds::new();
        for id in 1..=INBOUND_QOS2_MAX as u16 {
            ids.remember(id);
        }
        ids.forget(5);
        assert!(!ids.contains(5) && ids.contains(4) && ids.contains(6));
        ids.remember(100);
        assert!(ids.contains(1), "a free place: nothing is forgotten");
        ids.remember(101);
        assert!(!ids.contains(1), "full: the oldest goes");
        assert!(ids.contains(2) && ids.contains(100) && ids.contains(101));
        assert_eq!(ids.known().len(), INBOUND_QOS2_MAX);
        ids.forget(101);
        ids.forget(2);
        assert_eq!(ids.known().first(), Some(&3));
        assert_eq!(ids.known().last(), Some(&100));
    }
}
