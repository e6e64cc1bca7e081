//! Which peers' logs this agent follows live, shared by all its sessions.
//!
//! An agent tells each peer which other stores it follows directly (it subscribed
//! to their logs in a live session). A peer then does not relay to it the entries it
//! learned from those stores: the follower gets them from the source. In a full mesh
//! of N agents this turns N x (N - 1) copies of each change into N - 1.
//!
//! Relays are skipped on a claim, not on proof, so the claim is backed twice:
//!
//! - When a followed store leaves the set (its session ended) and does not come back
//!   and catch up within [`LOSS_GRACE_MS`], the agent walks the digest tree of each
//!   collection it followed with every live peer, which repairs whatever a peer
//!   skipped and the source never delivered. A source that comes back streams from
//!   the agent's durable cursor into its log, so once caught up it delivered all that
//!   it had: a link that flaps costs no walk.
//! - An agent that restarts forgets its claims, so its first session with each peer
//!   walks once it has caught up with the peer's log (see [`super::Session`]).
//!
//! [`Following`] is sans-IO: the QUIC driver keeps one behind a lock, the simulator
//! one per agent, and both hand it to [`super::Session::follow`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::store::StoreId;

/// How long a followed store that left may take to come back and catch up before
/// the agent walks the digests of what it followed with every peer.
pub const LOSS_GRACE_MS: u64 = 30_000;

/// Per collection, the stores whose logs this agent follows live.
pub type FollowMap = BTreeMap<String, BTreeSet<StoreId>>;

/// The sessions that follow a peer's logs, and what changed as they came and went.
#[derive(Debug, Default, Clone)]
pub struct Following {
    /// By session id: the peer's store and the collections subscribed to.
    sessions: BTreeMap<u64, (StoreId, Vec<String>)>,
    /// What the sessions add up to.
    map: FollowMap,
    /// Per collection, how many times a store left its set and did not come back in
    /// time: each time, every session walks the collection's digests with its peer.
    losses: BTreeMap<String, u64>,
    /// Stores that left, by collection, and when their grace ends.
    leaving: BTreeMap<(String, StoreId), Instant>,
    /// Bumped on every change of `map` or `losses`.
    version: u64,
    /// The peers a session finished its catch-up walk with since the agent started.
    walked: BTreeSet<StoreId>,
}

impl Following {
    /// Session `session` subscribed to `collections` of `peer`'s logs.
    pub fn add(&mut self, session: u64, peer: StoreId, collections: Vec<String>) {
        self.sessions.insert(session, (peer, collections));
        self.rebuild();
    }

    /// Session `session` ended.
    pub fn remove(&mut self, session: u64, now: Instant) {
        if self.sessions.remove(&session).is_some() {
            let before = self.map.clone();
            self.rebuild();
            let grace_end = now + Duration::from_millis(LOSS_GRACE_MS);
            for (collection, stores) in before {
                for store in stores {
                    if !self
                        .map
                        .get(&collection)
                        .is_some_and(|s| s.contains(&store))
                    {
                        self.leaving
                            .entry((collection.clone(), store))
                            .or_insert(grace_end);
                    }
                }
            }
        }
    }

    /// A session with `peer` applied everything the peer's logs held at its hello:
    /// whatever the peer had when an earlier session with it ended is here.
    pub fn caught_up(&mut self, peer: StoreId) {
        self.leaving.retain(|(_, store), _| *store != peer);
    }

    /// When [`Following::poll`] is due next, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        self.leaving.values().min().copied()
    }

    /// Counts as lost the stores whose grace ended (the sessions then walk).
    pub fn poll(&mut self, now: Instant) {
        let due: Vec<(String, StoreId)> = self
            .leaving
            .iter()
            .filter(|(_, end)| **end <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &due {
            self.leaving.remove(key);
            *self.losses.entry(key.0.clone()).or_default() += 1;
        }
        if !due.is_empty() {
            self.version += 1;
        }
    }

    fn rebuild(&mut self) {
        let mut map = FollowMap::new();
        for (peer, collections) in self.sessions.values() {
            for collection in collections {
                map.entry(collection.clone()).or_default().insert(*peer);
            }
        }
        if map == self.map {
            return;
        }
        self.map = map;
        self.version += 1;
    }

    /// Per collection, the stores followed live.
    pub fn map(&self) -> &FollowMap {
        &self.map
    }

    /// Per collection, how many times a followed store was lost.
    pub fn losses(&self) -> &BTreeMap<String, u64> {
        &self.losses
    }

    /// A session finished its catch-up walk with `peer`: later sessions with it skip
    /// theirs.
    pub fn walked(&mut self, peer: StoreId) {
        self.walked.insert(peer);
    }

    /// Whether a session finished its catch-up walk with `peer` since the start.
    pub fn has_walked(&self, peer: &StoreId) -> bool {
        self.walked.contains(peer)
    }

    /// Changes whenever [`Following::map`] or [`Following::losses`] does.
    pub fn version(&self) -> u64 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_counts_as_followed_while_any_session_with_it_is_subscribed() {
        let now = Instant::now();
        let mut f = Following::default();
        f.add(1, [1; 16], vec!["a".into(), "b".into()]);
        f.add(2, [2; 16], vec!["a".into()]);
        assert_eq!(f.map()["a"], BTreeSet::from([[1; 16], [2; 16]]));
        assert_eq!(f.map()["b"], BTreeSet::from([[1; 16]]));
        assert!(f.losses().is_empty());
        // A second session with the same store (a duplicate connection) ending
        // loses nothing.
        f.add(3, [1; 16], vec!["a".into(), "b".into()]);
        let version = f.version();
        f.remove(3, now);
        assert_eq!(f.version(), version);
        assert_eq!(f.deadline(), None);
        f.remove(1, now);
        assert_eq!(f.map()["a"], BTreeSet::from([[2; 16]]));
        assert!(!f.map().contains_key("b"));
        assert!(f.version() > version);
        // Not lost yet: the store may come back within its grace.
        let grace = Duration::from_millis(LOSS_GRACE_MS);
        assert_eq!(f.deadline(), Some(now + grace));
        f.poll(now + grace - Duration::from_millis(1));
        assert!(f.losses().is_empty());
        f.poll(now + grace);
        assert_eq!(f.losses().get("a"), Some(&1));
        assert_eq!(f.losses().get("b"), Some(&1));
        assert_eq!(f.deadline(), None);
    }

    #[test]
    fn a_store_that_comes_back_and_catches_up_in_time_is_not_lost() {
        let now = Instant::now();
        let mut f = Following::default();
        f.add(1, [1; 16], vec!["a".into()]);
        f.remove(1, now);
        f.add(2, [1; 16], vec!["a".into()]);
        // Followed again, but not caught up: still leaving.
        assert!(f.deadline().is_some());
        f.caught_up([1; 16]);
        assert_eq!(f.deadline(), None);
        f.poll(now + Duration::from_millis(LOSS_GRACE_MS));
        assert!(f.losses().is_empty());
    }
}
