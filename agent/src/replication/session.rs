//! The replication session with one peer, as a sans-IO state machine.
//!
//! The driver feeds it frames ([`Session::handle`]), the passage of time
//! ([`Session::handle_timeout`]) and the answers to its events; it takes out frames
//! to send ([`Session::poll_transmit`]) and events to act on ([`Session::poll_event`]).
//! Log reads go through [`Session::wants`] and [`Session::send_entries`], so the
//! session never touches the store itself.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::PROTOCOL_VERSION;
use super::follow::{FollowMap, Following};
use super::message::{Message, decode, encode};
use super::policy::Action;
use crate::engine::WireEntry;
use crate::store::{LogEntry, StoreId};

/// Log entries sent in one message at most.
pub const ENTRIES_PER_MESSAGE_MAX: usize = 512;
/// Change bytes sent in one message at most (one entry may exceed it alone).
pub const MESSAGE_CHANGE_BYTES_MAX: usize = 1024 * 1024;
/// Entries sent but not yet acknowledged, per collection, at most (flow control).
pub const IN_FLIGHT_ENTRIES_MAX: usize = 8192;
/// Collections in one subscription at most.
pub const SUBSCRIBE_COLLECTIONS_MAX: usize = 1024;
/// How long an acknowledgement may wait to be sent with others.
pub const ACK_DELAY_MS: u64 = 20;
/// Entries acknowledged at once at most: more are acknowledged without delay.
pub const ACK_ENTRIES_MAX: usize = IN_FLIGHT_ENTRIES_MAX / 4;
/// Heads of one document in a repair request at most.
pub const DOC_HEADS_MAX: usize = 1024;
/// How long sent entries may wait for their acknowledgement before the session is
/// deemed broken (a lost message) and reset.
pub const ACK_TIMEOUT_MS: u64 = 30_000;
/// How long a peer has to subscribe after the hellos.
pub const SUBSCRIBE_TIMEOUT_MS: u64 = 10_000;
/// How long a peer has to say hello.
pub const HELLO_TIMEOUT_MS: u64 = 10_000;
/// Stores named in one [`Message::Following`] at most.
pub const FOLLOWED_STORES_MAX: usize = 4096;
/// Repair requests (`NeedDoc`) sent and not yet answered, at most; more are not sent
/// until answers arrive (the document stays waiting and is asked for again later).
pub const NEED_DOCS_IN_FLIGHT_MAX: usize = 4096;

/// Something the driver must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The peer introduced itself: answer with [`Session::subscribe`], giving the
    /// cursors persisted for this peer store.
    PeerHello {
        /// The peer's store id.
        store: StoreId,
        /// The last seq of each of the peer's logs this agent syncs.
        heads: Vec<(String, u64)>,
    },
    /// Entries of the peer's log to apply; then call [`Session::applied`].
    Apply {
        /// The collection.
        collection: String,
        /// Every seq up to this one was considered by the sender.
        upto: u64,
        /// The entries.
        entries: Vec<WireEntry>,
    },
    /// The peer lacks changes of a document: the policy answers with `DocChanges`,
    /// with no changes if the document is unknown here.
    NeedDoc {
        /// The document's collection.
        collection: String,
        /// The document.
        doc: [u8; 16],
        /// The peer's heads of it.
        heads: Vec<[u8; 32]>,
    },
    /// The peer asks for the digests of the children of a node of the digest tree:
    /// the policy answers with `Digests`.
    DigestQuery {
        /// The collection.
        collection: String,
        /// The node's depth (0, 6 or 12).
        depth: u8,
        /// The node's prefix.
        prefix: u32,
    },
    /// The peer asks for the documents of a bucket: the policy answers with `Bucket`.
    BucketQuery {
        /// The collection.
        collection: String,
        /// The bucket.
        bucket: u16,
    },
    /// The peer's digests of the children of a node: query the children whose
    /// digest differs from ours, then call [`Session::answered`].
    Digests {
        /// The collection.
        collection: String,
        /// The node's depth.
        depth: u8,
        /// The node's prefix.
        prefix: u32,
        /// One digest per child.
        digests: Vec<u64>,
    },
    /// The peer's documents of a bucket: repair those whose digest differs from
    /// ours, then call [`Session::answered`].
    Bucket {
        /// The collection.
        collection: String,
        /// The bucket.
        bucket: u16,
        /// (document, heads digest).
        docs: Vec<([u8; 16], u64)>,
    },
    /// Anti-entropy of a collection finished: every difference found was repaired.
    AntiEntropyDone {
        /// The collection.
        collection: String,
    },
    /// Changes of one document the peer sent for repair: apply them, then call
    /// [`Session::repaired`].
    DocChanges {
        /// The collection.
        collection: String,
        /// The document.
        doc: [u8; 16],
        /// The changes.
        changes: Vec<Vec<u8>>,
    },
}

/// The peer broke the protocol; the session (and only it) must be closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// A frame that is not a message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message that is valid but not allowed at this point.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {0}, this agent speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The peer did not say hello in time.
    #[error("peer did not say hello within {HELLO_TIMEOUT_MS} ms")]
    HelloTimeout,
    /// A message larger than the protocol allows.
    #[error("message exceeds a protocol limit: {0}")]
    Limit(&'static str),
    /// A message arrived out of turn: one was lost, repeated or reordered.
    #[error("message {got} arrived when {expected} was due")]
    Sequence {
        /// The number due.
        expected: u64,
        /// The number received.
        got: u64,
    },
    /// Entries sent were not acknowledged in time.
    #[error("entries sent were not acknowledged within {ACK_TIMEOUT_MS} ms")]
    AckTimeout,
    /// The peer did not subscribe in time.
    #[error("peer did not subscribe within {SUBSCRIBE_TIMEOUT_MS} ms")]
    SubscribeTimeout,
}

#[derive(Debug, Default)]
struct Stream {
    /// The next seq of the local log to read.
    next: u64,
    /// The `upto` of the last message sent.
    sent_upto: u64,
    /// Messages sent and not yet acknowledged: (upto, entries, when sent).
    unacked: VecDeque<(u64, usize, Instant)>,
    /// Entries sent and not yet acknowledged.
    in_flight: usize,
    /// The last read found the end of the log.
    caught_up: bool,
    /// A message moved the peer's cursor in this session.
    advanced: bool,
    /// The last seq the peer acknowledged (or had when it subscribed).
    acked: u64,
}

#[derive(Debug, Default)]
struct Inbound {
    /// The last `upto` received.
    upto: u64,
    /// The last `upto` applied and durable.
    applied: u64,
    /// The peer's last seq as of its hello.
    hello_head: u64,
}

/// What a session did and where its streams stand, for the agent's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionProgress {
    /// Log entries sent in this session.
    pub sent: u64,
    /// Log entries received in this session.
    pub received: u64,
    /// Per outbound collection: (collection, entries in flight, next seq to read,
    /// last seq acknowledged).
    pub streams: Vec<(String, u64, u64, u64)>,
    /// Entries of the peer's logs, as of its hello, not received yet (`None` before
    /// this agent subscribed).
    pub incoming_behind: Option<u64>,
}

/// The replication session with one peer.
#[derive(Debug)]
pub struct Session {
    local: StoreId,
    peer: Option<StoreId>,
    hello_deadline: Option<Instant>,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    streams: BTreeMap<String, Stream>,
    inbound: BTreeMap<String, Inbound>,
    /// The collections this agent syncs with the peer: nothing else is streamed,
    /// repaired or answered.
    collections: BTreeSet<String>,
    /// Per collection in anti-entropy: queries and repairs not yet answered.
    anti_entropy: BTreeMap<String, usize>,
    /// Repair requests sent and not answered, in order: (document, collection,
    /// whether anti-entropy counts it). The peer answers them in order.
    asked: VecDeque<([u8; 16], String, bool)>,
    /// Repair answers received and handed to the driver, not yet applied, in order.
    repairing: VecDeque<([u8; 16], String, bool)>,
    /// Acknowledgements not sent yet: collection to the last seq persisted.
    acks: BTreeMap<String, u64>,
    /// Entries covered by `acks`.
    ack_entries: usize,
    /// When `acks` must be sent.
    ack_deadline: Option<Instant>,
    /// When the peer must have subscribed.
    subscribe_deadline: Option<Instant>,
    /// The number of the next message sent.
    send_seq: u64,
    /// The number of the next message due.
    recv_seq: u64,
    /// The peer's heads from its hello.
    hello_heads: BTreeMap<String, u64>,
    /// Log entries sent and received in this session, and acknowledgements received.
    sent_entries: u64,
    received_entries: u64,
    acks_received: u64,
    /// Acknowledgements received and not yet taken: (collection, acked before, now).
    acked: Vec<(String, u64, u64)>,
    /// This agent's log heads as of its hello: the peer's cursor is moved past them
    /// even when every entry up to them is skipped, so the peer sees it caught up.
    own_heads: BTreeMap<String, u64>,
    /// The collections this agent subscribed to (set once it did).
    subscribed: Option<Vec<String>>,
    /// The stores the peer follows live, per collection: their entries are not
    /// relayed to it.
    peer_follows: FollowMap,
    /// The stores this agent told the peer it follows, per collection.
    announced: FollowMap,
    /// The losses of followed stores seen (see [`Following::losses`]); `None` until
    /// the first [`Session::follow`] after the hello.
    losses_seen: Option<BTreeMap<String, u64>>,
    /// The walk made once this agent caught up with the peer's logs.
    catch_up_walk: CatchUpWalk,
    /// The collections it walks: those whose cursor into the peer's log was
    /// persisted before this session (from an earlier life of this agent, perhaps).
    catch_up_collections: Vec<String>,
}

/// Where a session's catch-up walk stands (see [`Session::follow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUpWalk {
    /// Due once every entry of the peer's logs as of its hello is applied.
    Due,
    /// Started: done when every walk of the session is.
    Running,
    /// Finished, or not needed (an earlier session with the peer finished one).
    Done,
}

impl Session {
    /// A new session of the store `local`, syncing the collections of `heads`, whose
    /// logs end at `heads`; queues the hello.
    pub fn new(local: StoreId, heads: Vec<(String, u64)>, now: Instant) -> Session {
        let collections: Vec<String> = heads.iter().map(|(c, _)| c.clone()).collect();
        let own_heads = heads.iter().cloned().collect();
        let mut session = Session {
            local,
            peer: None,
            hello_deadline: Some(now + Duration::from_millis(HELLO_TIMEOUT_MS)),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            streams: BTreeMap::new(),
            inbound: BTreeMap::new(),
            collections: collections.into_iter().collect(),
            anti_entropy: BTreeMap::new(),
            asked: VecDeque::new(),
            repairing: VecDeque::new(),
            acks: BTreeMap::new(),
            ack_entries: 0,
            ack_deadline: None,
            subscribe_deadline: None,
            send_seq: 0,
            recv_seq: 0,
            hello_heads: BTreeMap::new(),
            sent_entries: 0,
            received_entries: 0,
            acks_received: 0,
            acked: Vec::new(),
            own_heads,
            subscribed: None,
            peer_follows: FollowMap::new(),
            announced: FollowMap::new(),
            losses_seen: None,
            catch_up_walk: CatchUpWalk::Due,
            catch_up_collections: Vec::new(),
        };
        session.queue(&Message::Hello {
            version: PROTOCOL_VERSION,
            store: local,
            heads,
        });
        session
    }

    /// The peer's store id, once it said hello.
    pub fn peer(&self) -> Option<StoreId> {
        self.peer
    }

    /// Handles one frame from the peer.
    pub fn handle(&mut self, now: Instant, frame: &[u8]) -> Result<(), ProtocolError> {
        let (seq, message) = decode(frame).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        if seq != self.recv_seq {
            return Err(ProtocolError::Sequence {
                expected: self.recv_seq,
                got: seq,
            });
        }
        self.recv_seq += 1;
        if self.peer.is_none() && !matches!(message, Message::Hello { .. }) {
            return Err(ProtocolError::Unexpected("a message before hello"));
        }
        match message {
            Message::Hello {
                version,
                store,
                heads,
            } => self.on_hello(now, version, store, heads),
            Message::Subscribe { cursors } => self.on_subscribe(cursors),
            Message::Entries {
                collection,
                upto,
                entries,
            } => self.on_entries(collection, upto, entries),
            Message::Ack { collection, upto } => self.on_ack(&collection, upto),
            Message::NeedDoc {
                collection,
                doc,
                heads,
            } => {
                if heads.len() > DOC_HEADS_MAX {
                    return Err(ProtocolError::Limit("heads of a document"));
                }
                self.check_collection(&collection)?;
                self.events.push_back(Event::NeedDoc {
                    collection,
                    doc,
                    heads,
                });
                Ok(())
            }
            Message::DigestQuery {
                collection,
                depth,
                prefix,
            } => {
                if crate::store::child_bits(depth).is_none() || u64::from(prefix) >= 1 << depth {
                    return Err(ProtocolError::Unexpected("a digest query outside the tree"));
                }
                self.check_collection(&collection)?;
                self.events.push_back(Event::DigestQuery {
                    collection,
                    depth,
                    prefix,
                });
                Ok(())
            }
            Message::BucketQuery { collection, bucket } => {
                self.check_collection(&collection)?;
                self.events
                    .push_back(Event::BucketQuery { collection, bucket });
                Ok(())
            }
            Message::Digests {
                collection,
                depth,
                prefix,
                digests,
            } => self.on_digests(collection, depth, prefix, digests),
            Message::Bucket {
                collection,
                bucket,
                docs,
            } => {
                if !self.anti_entropy.contains_key(&collection) {
                    return Err(ProtocolError::Unexpected("a bucket not asked for"));
                }
                self.events.push_back(Event::Bucket {
                    collection,
                    bucket,
                    docs,
                });
                Ok(())
            }
            Message::DocChanges {
                collection,
                doc,
                changes,
            } => self.on_doc_changes(collection, doc, changes),
            Message::Following { collection, stores } => {
                if stores.len() > FOLLOWED_STORES_MAX {
                    return Err(ProtocolError::Limit("stores followed"));
                }
                self.check_collection(&collection)?;
                self.peer_follows
                    .insert(collection, stores.into_iter().collect());
                Ok(())
            }
        }
    }

    fn on_hello(
        &mut self,
        now: Instant,
        version: u16,
        store: StoreId,
        heads: Vec<(String, u64)>,
    ) -> Result<(), ProtocolError> {
        if heads.len() > SUBSCRIBE_COLLECTIONS_MAX {
            return Err(ProtocolError::Limit("collections in a hello"));
        }
        if self.peer.is_some() {
            return Err(ProtocolError::Unexpected("a second hello"));
        }
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version(version));
        }
        if store == self.local {
            return Err(ProtocolError::Unexpected("a hello from this very store"));
        }
        self.peer = Some(store);
        self.hello_deadline = None;
        self.subscribe_deadline = Some(now + Duration::from_millis(SUBSCRIBE_TIMEOUT_MS));
        let heads: Vec<(String, u64)> = heads
            .into_iter()
            .filter(|(c, _)| self.collections.contains(c))
            .collect();
        self.hello_heads = heads.iter().cloned().collect();
        self.events.push_back(Event::PeerHello { store, heads });
        Ok(())
    }

    fn on_subscribe(&mut self, cursors: Vec<(String, u64)>) -> Result<(), ProtocolError> {
        if cursors.len() > SUBSCRIBE_COLLECTIONS_MAX {
            return Err(ProtocolError::Limit("collections in a subscription"));
        }
        if self.subscribe_deadline.take().is_none() {
            return Err(ProtocolError::Unexpected("a second subscription"));
        }
        for (collection, next) in cursors {
            // A collection this agent does not sync with the peer is not streamed
            // (and costs nothing).
            if !self.collections.contains(&collection) {
                continue;
            }
            let next = next.max(1);
            let stream = Stream {
                next,
                sent_upto: next - 1,
                acked: next - 1,
                ..Stream::default()
            };
            self.streams.insert(collection, stream);
        }
        Ok(())
    }

    fn on_entries(
        &mut self,
        collection: String,
        upto: u64,
        entries: Vec<WireEntry>,
    ) -> Result<(), ProtocolError> {
        if entries.len() > ENTRIES_PER_MESSAGE_MAX {
            return Err(ProtocolError::Limit("entries in a message"));
        }
        let Some(inbound) = self.inbound.get_mut(&collection) else {
            return Err(ProtocolError::Unexpected(
                "entries of a collection not subscribed to",
            ));
        };
        let mut last = inbound.upto;
        for entry in &entries {
            if entry.seq <= last || entry.seq > upto {
                return Err(ProtocolError::Unexpected("entries out of order"));
            }
            last = entry.seq;
        }
        if upto < inbound.upto {
            return Err(ProtocolError::Unexpected("a log that went backwards"));
        }
        inbound.upto = upto;
        self.received_entries += entries.len() as u64;
        self.events.push_back(Event::Apply {
            collection,
            upto,
            entries,
        });
        Ok(())
    }

    fn on_ack(&mut self, collection: &str, upto: u64) -> Result<(), ProtocolError> {
        let Some(stream) = self.streams.get_mut(collection) else {
            return Err(ProtocolError::Unexpected(
                "ack of a collection not streamed",
            ));
        };
        if upto > stream.sent_upto {
            return Err(ProtocolError::Unexpected("ack of entries never sent"));
        }
        while let Some(&(sent, entries, _)) = stream.unacked.front() {
            if sent > upto {
                break;
            }
            stream.unacked.pop_front();
            stream.in_flight -= entries;
        }
        self.acks_received += 1;
        if upto > stream.acked {
            // One entry per collection until taken: bounded whoever drives the session.
            match self.acked.iter_mut().find(|(c, _, _)| c == collection) {
                Some((_, _, last)) => *last = upto,
                None => self.acked.push((collection.to_owned(), stream.acked, upto)),
            }
            stream.acked = upto;
        }
        Ok(())
    }

    fn on_digests(
        &mut self,
        collection: String,
        depth: u8,
        prefix: u32,
        digests: Vec<u64>,
    ) -> Result<(), ProtocolError> {
        let bits = crate::store::child_bits(depth)
            .ok_or(ProtocolError::Unexpected("digests outside the tree"))?;
        if digests.len() != 1 << bits || !self.anti_entropy.contains_key(&collection) {
            return Err(ProtocolError::Unexpected("digests not asked for"));
        }
        self.events.push_back(Event::Digests {
            collection,
            depth,
            prefix,
            digests,
        });
        Ok(())
    }

    fn on_doc_changes(
        &mut self,
        collection: String,
        doc: [u8; 16],
        changes: Vec<Vec<u8>>,
    ) -> Result<(), ProtocolError> {
        // Only the answer to the oldest repair request is accepted: changes nobody
        // asked for are refused.
        match self.asked.pop_front() {
            Some(asked) if asked.0 == doc && asked.1 == collection => {
                self.repairing.push_back(asked);
            }
            _ => {
                return Err(ProtocolError::Unexpected(
                    "changes of a document not asked for",
                ));
            }
        }
        self.events.push_back(Event::DocChanges {
            collection,
            doc,
            changes,
        });
        Ok(())
    }

    /// Answers [`Event::PeerHello`]: asks the peer to stream each collection from the
    /// given next seq.
    pub fn subscribe(&mut self, cursors: Vec<(String, u64)>) {
        for (collection, next) in &cursors {
            self.inbound.insert(
                collection.clone(),
                Inbound {
                    upto: next.saturating_sub(1),
                    applied: next.saturating_sub(1),
                    hello_head: self.hello_heads.get(collection).copied().unwrap_or(0),
                },
            );
        }
        self.subscribed = Some(cursors.iter().map(|(c, _)| c.clone()).collect());
        // A log read from its start holds every entry the peer may have skipped
        // before: only a cursor that moved needs the catch-up walk.
        self.catch_up_collections = cursors
            .iter()
            .filter(|(_, next)| *next > 1)
            .map(|(c, _)| c.clone())
            .collect();
        self.queue(&Message::Subscribe { cursors });
    }

    /// The peer's store and the collections of its logs this agent subscribed to,
    /// once it did: the driver adds them to its [`Following`].
    pub fn following(&self) -> Option<(StoreId, &[String])> {
        Some((self.peer?, self.subscribed.as_deref()?))
    }

    /// Tells the peer which stores this agent follows live (what changed since it was
    /// last told), and walks the digests of each collection that lost a followed
    /// store since the last call: the peer may have skipped relaying entries that
    /// store then never delivered. Call it after the hello and whenever
    /// [`Following::version`] changes.
    ///
    /// The first session with a peer since the agent started also walks once it has
    /// caught up with the peer's logs: before a restart this agent may have told the
    /// peer it followed a store that never delivered what the peer then skipped.
    pub fn follow(&mut self, following: &Following) {
        let Some(peer) = self.peer else {
            return;
        };
        if self.losses_seen.is_none() && following.has_walked(&peer) {
            self.catch_up_walk = CatchUpWalk::Done;
        }
        let collections: Vec<String> = self.collections.iter().cloned().collect();
        for collection in &collections {
            let mut stores = following.map().get(collection).cloned().unwrap_or_default();
            stores.remove(&peer);
            let told = self.announced.get(collection);
            if told.map_or(stores.is_empty(), |told| *told == stores) {
                continue;
            }
            self.queue(&Message::Following {
                collection: collection.clone(),
                stores: stores.iter().copied().collect(),
            });
            self.announced.insert(collection.clone(), stores);
        }
        // After the announcements: the peer stops skipping before it answers the
        // walk, so nothing falls between the two.
        let losses = following.losses();
        if let Some(seen) = self.losses_seen.take() {
            for collection in &collections {
                let before = seen.get(collection).copied().unwrap_or(0);
                if losses.get(collection).copied().unwrap_or(0) > before {
                    self.start_anti_entropy(collection.clone());
                }
            }
        }
        self.losses_seen = Some(losses.clone());
        self.walk_once_caught_up();
    }

    /// Whether every entry of the peer's logs as of its hello is applied here: the
    /// driver tells its [`Following`] ([`Following::caught_up`]).
    pub fn caught_up(&self) -> bool {
        !self.inbound.is_empty() && self.inbound.values().all(|i| i.applied >= i.hello_head)
    }

    /// Whether this session finished its catch-up walk: the driver records it with
    /// [`Following::walked`].
    pub fn caught_up_walk_done(&self) -> bool {
        self.catch_up_walk == CatchUpWalk::Done && self.losses_seen.is_some()
    }

    /// Starts the catch-up walk (see [`Session::follow`]) once it is due and every
    /// entry of the peer's logs as of its hello is applied here.
    fn walk_once_caught_up(&mut self) {
        if self.catch_up_walk != CatchUpWalk::Due || self.losses_seen.is_none() || !self.caught_up()
        {
            return;
        }
        self.catch_up_walk = CatchUpWalk::Running;
        let collections: Vec<String> = std::mem::take(&mut self.catch_up_collections)
            .into_iter()
            .filter(|c| !self.anti_entropy.contains_key(c))
            .collect();
        if collections.is_empty() && self.anti_entropy.is_empty() {
            self.catch_up_walk = CatchUpWalk::Done;
        }
        for collection in collections {
            self.start_anti_entropy(collection);
        }
    }

    /// Acknowledges that `entries` entries up to `upto` of `collection` are persisted.
    /// Acknowledgements wait up to [`ACK_DELAY_MS`] to travel together, unless
    /// [`ACK_ENTRIES_MAX`] entries are waiting.
    pub fn applied(&mut self, now: Instant, collection: String, upto: u64, entries: usize) {
        if let Some(inbound) = self.inbound.get_mut(&collection) {
            inbound.applied = inbound.applied.max(upto);
        }
        let acked = self.acks.entry(collection).or_default();
        *acked = (*acked).max(upto);
        self.ack_entries += entries;
        if self.ack_entries >= ACK_ENTRIES_MAX {
            self.flush_acks();
        } else if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + Duration::from_millis(ACK_DELAY_MS));
        }
    }

    fn flush_acks(&mut self) {
        for (collection, upto) in std::mem::take(&mut self.acks) {
            self.queue(&Message::Ack { collection, upto });
        }
        self.ack_entries = 0;
        self.ack_deadline = None;
    }

    /// Asks the peer for the changes of `doc` that a document with `heads` lacks.
    /// Returns false, asking nothing, when [`NEED_DOCS_IN_FLIGHT_MAX`] requests wait
    /// for their answers.
    pub fn need_doc(&mut self, collection: String, doc: [u8; 16], heads: Vec<[u8; 32]>) -> bool {
        self.ask(collection, doc, heads, false)
    }

    fn ask(
        &mut self,
        collection: String,
        doc: [u8; 16],
        heads: Vec<[u8; 32]>,
        anti_entropy: bool,
    ) -> bool {
        if self.asked.len() + self.repairing.len() >= NEED_DOCS_IN_FLIGHT_MAX {
            return false;
        }
        self.asked
            .push_back((doc, collection.clone(), anti_entropy));
        self.queue(&Message::NeedDoc {
            collection,
            doc,
            heads,
        });
        true
    }

    fn check_collection(&self, collection: &str) -> Result<(), ProtocolError> {
        if self.collections.contains(collection) {
            Ok(())
        } else {
            Err(ProtocolError::Unexpected(
                "a request about a collection not synced with this peer",
            ))
        }
    }

    /// Starts anti-entropy of `collection`: walk the peer's digest tree from the root
    /// and repair every document whose heads differ. [`Event::AntiEntropyDone`]
    /// follows once every query and repair is answered.
    pub fn start_anti_entropy(&mut self, collection: String) {
        self.query_digests(collection, 0, 0);
    }

    /// Asks for the digests of the children of a node (counted for anti-entropy).
    pub fn query_digests(&mut self, collection: String, depth: u8, prefix: u32) {
        *self.anti_entropy.entry(collection.clone()).or_default() += 1;
        self.queue(&Message::DigestQuery {
            collection,
            depth,
            prefix,
        });
    }

    /// Asks for the documents of a bucket (counted for anti-entropy).
    pub fn query_bucket(&mut self, collection: String, bucket: u16) {
        *self.anti_entropy.entry(collection.clone()).or_default() += 1;
        self.queue(&Message::BucketQuery { collection, bucket });
    }

    /// Asks for what a document lacks (counted for anti-entropy until
    /// [`Session::repaired`]).
    pub fn repair(&mut self, collection: String, doc: [u8; 16], heads: Vec<[u8; 32]>) {
        *self.anti_entropy.entry(collection.clone()).or_default() += 1;
        if !self.ask(collection.clone(), doc, heads, true) {
            // Too many repairs wait; this one is left for the next session's walk.
            self.answered(&collection);
        }
    }

    /// Acts on an [`Event::Digests`], given our digests of the same children: queries
    /// every child whose digest differs (its children, or its documents at the last
    /// level), then counts the answer.
    pub fn compare_digests(
        &mut self,
        collection: &str,
        depth: u8,
        prefix: u32,
        theirs: &[u64],
        ours: &[u64],
    ) {
        let bits = crate::store::child_bits(depth).unwrap_or(0);
        for (child, (theirs, ours)) in theirs.iter().zip(ours).enumerate() {
            if theirs == ours {
                continue;
            }
            let prefix = (prefix << bits) | child as u32;
            if depth + bits == 16 {
                self.query_bucket(collection.to_owned(), prefix as u16);
            } else {
                self.query_digests(collection.to_owned(), depth + bits, prefix);
            }
        }
        self.answered(collection);
    }

    /// The driver acted on an [`Event::Digests`] or [`Event::Bucket`].
    pub fn answered(&mut self, collection: &str) {
        let Some(left) = self.anti_entropy.get_mut(collection) else {
            return;
        };
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.anti_entropy.remove(collection);
            self.events.push_back(Event::AntiEntropyDone {
                collection: collection.to_owned(),
            });
            if self.catch_up_walk == CatchUpWalk::Running && self.anti_entropy.is_empty() {
                self.catch_up_walk = CatchUpWalk::Done;
            }
        }
    }

    /// The driver applied the changes of `doc` from an [`Event::DocChanges`].
    pub fn repaired(&mut self, doc: [u8; 16]) {
        debug_assert!(self.repairing.front().is_some_and(|(d, _, _)| *d == doc));
        if let Some((_, collection, anti_entropy)) = self.repairing.pop_front()
            && anti_entropy
        {
            self.answered(&collection);
        }
    }

    /// Carries out an [`Action`] of the peer policy, once its batch is committed.
    pub fn act(&mut self, now: Instant, action: Action) {
        match action {
            Action::Subscribe {
                cursors,
                anti_entropy,
            } => {
                self.subscribe(cursors);
                for collection in anti_entropy {
                    self.start_anti_entropy(collection);
                }
                self.walk_once_caught_up();
            }
            Action::Applied {
                collection,
                upto,
                entries,
            } => {
                self.applied(now, collection, upto, entries);
                self.walk_once_caught_up();
            }
            Action::Ask {
                collection,
                doc,
                heads,
            } => {
                self.need_doc(collection, doc, heads);
            }
            Action::Repaired { doc } => self.repaired(doc),
            Action::Answer(message) => self.queue(&message),
            Action::CompareDigests {
                collection,
                depth,
                prefix,
                theirs,
                ours,
            } => self.compare_digests(&collection, depth, prefix, &theirs, &ours),
            Action::Repair {
                collection,
                doc,
                heads,
            } => self.repair(collection, doc, heads),
            Action::Answered { collection } => self.answered(&collection),
        }
    }

    /// The log reads the session wants now: (collection, first seq, most entries).
    pub fn wants(&self) -> Vec<(String, u64, usize)> {
        self.streams
            .iter()
            .filter(|(_, s)| !s.caught_up && s.in_flight < IN_FLIGHT_ENTRIES_MAX)
            .map(|(c, s)| {
                (
                    c.clone(),
                    s.next,
                    (IN_FLIGHT_ENTRIES_MAX - s.in_flight).min(ENTRIES_PER_MESSAGE_MAX),
                )
            })
            .collect()
    }

    /// Gives the session what a log read for [`Session::wants`] returned (`max` is
    /// what was asked for). Entries the peer itself sent are not sent back, nor
    /// entries with no changes; a read holding nothing else sends nothing (the
    /// peer's cursor lags, and a replay skips the same entries again).
    pub fn send_entries(
        &mut self,
        now: Instant,
        collection: &str,
        read: Vec<(u64, LogEntry)>,
        max: usize,
    ) {
        let peer = self.peer;
        let own_head = self.own_heads.get(collection).copied().unwrap_or(0);
        let follows = self.peer_follows.get(collection);
        let Some(stream) = self.streams.get_mut(collection) else {
            return;
        };
        if read.len() < max {
            stream.caught_up = true;
        }
        let Some(&(last_read, _)) = read.last() else {
            return;
        };
        let mut entries = Vec::with_capacity(read.len());
        let mut bytes = 0usize;
        let mut upto = last_read;
        for (seq, entry) in read {
            if bytes >= MESSAGE_CHANGE_BYTES_MAX {
                upto = seq - 1;
                stream.caught_up = false;
                break;
            }
            // An empty entry has nothing to send: a trimmed entry whose document's
            // changes went out with an earlier entry of this read and origin. Nor
            // are entries learned from the peer, or from a store it follows itself.
            let learned_from = |store: &StoreId| {
                Some(*store) == peer || follows.is_some_and(|f| f.contains(store))
            };
            if entry.changes.is_empty() || entry.origin.as_ref().is_some_and(learned_from) {
                continue;
            }
            bytes += entry.changes.iter().map(Vec::len).sum::<usize>();
            entries.push(WireEntry {
                seq,
                doc: entry.doc,
                changes: entry.changes,
            });
        }
        stream.next = upto + 1;
        // A read of only skipped entries sends nothing, except an empty message that
        // moves the peer's cursor: once a session when nothing was sent yet (so a
        // peer that only ever sent to this agent does not walk digests on every
        // reconnect as if its cursor were lost), once past this agent's hello head
        // (so the peer sees it caught up), and whenever its cursor would lag a
        // message's worth of entries (so a reconnect does not read them all again).
        let first = !stream.advanced && stream.caught_up;
        let past_hello = stream.sent_upto < own_head && upto >= own_head;
        let lagging = upto - stream.sent_upto >= ENTRIES_PER_MESSAGE_MAX as u64;
        if entries.is_empty() && !(first || past_hello || lagging) {
            return;
        }
        stream.advanced = true;
        stream.sent_upto = upto;
        stream.unacked.push_back((upto, entries.len(), now));
        stream.in_flight += entries.len();
        self.sent_entries += entries.len() as u64;
        let message = Message::Entries {
            collection: collection.to_owned(),
            upto,
            entries,
        };
        self.queue(&message);
    }

    /// What the session did and where its streams stand.
    pub fn progress(&self) -> SessionProgress {
        let subscribed = !self.inbound.is_empty();
        SessionProgress {
            sent: self.sent_entries,
            received: self.received_entries,
            streams: self
                .streams
                .iter()
                .map(|(c, s)| (c.clone(), s.in_flight as u64, s.next, s.acked))
                .collect(),
            incoming_behind: subscribed.then(|| {
                self.inbound
                    .values()
                    .map(|i| i.hello_head.saturating_sub(i.upto))
                    .sum()
            }),
        }
    }

    /// Entries sent, entries received and acknowledgements received in this session:
    /// a cheap sign that something moved.
    pub fn counters(&self) -> (u64, u64, u64) {
        (self.sent_entries, self.received_entries, self.acks_received)
    }

    /// The acknowledgements received since the last call: (collection, the last seq
    /// acknowledged before, the last now).
    pub fn take_acked(&mut self) -> Vec<(String, u64, u64)> {
        std::mem::take(&mut self.acked)
    }

    /// The local log grew: streams that were caught up read again.
    pub fn log_grew(&mut self) {
        for stream in self.streams.values_mut() {
            stream.caught_up = false;
        }
    }

    /// The next frame to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The next event to act on, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let unacked = self
            .streams
            .values()
            .filter_map(|s| s.unacked.front())
            .map(|&(_, _, sent)| sent);
        [
            self.hello_deadline,
            self.ack_deadline,
            self.subscribe_deadline,
        ]
        .into_iter()
        .flatten()
        .chain(unacked.map(|sent| sent + Duration::from_millis(ACK_TIMEOUT_MS)))
        .min()
    }

    /// Lets time pass; fails if the peer missed a deadline.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ProtocolError> {
        if self.ack_deadline.is_some_and(|deadline| now >= deadline) {
            self.flush_acks();
        }
        let passed = |deadline: Option<Instant>| deadline.is_some_and(|d| now >= d);
        if passed(self.hello_deadline) {
            return Err(ProtocolError::HelloTimeout);
        }
        if passed(self.subscribe_deadline) {
            return Err(ProtocolError::SubscribeTimeout);
        }
        let ack_due = Duration::from_millis(ACK_TIMEOUT_MS);
        if self.streams.values().any(|s| {
            s.unacked
                .front()
                .is_some_and(|&(_, _, sent)| now >= sent + ack_due)
        }) {
            return Err(ProtocolError::AckTimeout);
        }
        Ok(())
    }

    fn queue(&mut self, message: &Message) {
        self.transmit.push_back(encode(self.send_seq, message));
        self.send_seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(doc: u8, origin: Option<StoreId>) -> LogEntry {
        LogEntry {
            doc: [doc; 16],
            changes: vec![vec![doc; 4]],
            origin,
        }
    }

    /// Delivers every queued frame from `from` to `to`.
    fn deliver(from: &mut Session, to: &mut Session, now: Instant) -> Result<usize, ProtocolError> {
        let mut n = 0;
        while let Some(frame) = from.poll_transmit() {
            to.handle(now, &frame)?;
            n += 1;
        }
        Ok(n)
    }

    #[test]
    fn streams_the_log_from_the_cursor_skipping_the_peers_own_entries() -> Result<(), ProtocolError>
    {
        let now = Instant::now();
        let (a_id, b_id) = ([1; 16], [2; 16]);
        let mut a = Session::new(a_id, vec![("customers".into(), 0), ("c".into(), 0)], now);
        let mut b = Session::new(b_id, vec![("customers".into(), 0), ("c".into(), 0)], now);
        deliver(&mut a, &mut b, now)?;
        deliver(&mut b, &mut a, now)?;
        assert!(matches!(a.poll_event(), Some(Event::PeerHello { store, .. }) if store == b_id));
        assert!(matches!(b.poll_event(), Some(Event::PeerHello { store, .. }) if store == a_id));
        // B already holds A's log up to seq 2.
        b.subscribe(vec![("customers".into(), 3)]);
        deliver(&mut b, &mut a, now)?;
        assert_eq!(
            a.wants(),
            vec![("customers".to_owned(), 3, ENTRIES_PER_MESSAGE_MAX)]
        );
        let log = vec![
            (3, entry(3, None)),
            (4, entry(4, Some(b_id))),
            (5, entry(5, Some([9; 16]))),
        ];
        a.send_entries(now, "customers", log, ENTRIES_PER_MESSAGE_MAX);
        assert!(a.wants().is_empty(), "a short read means caught up");
        deliver(&mut a, &mut b, now)?;
        match b.poll_event() {
            Some(Event::Apply {
                collection,
                upto,
                entries,
            }) => {
                assert_eq!(collection, "customers");
                assert_eq!(upto, 5);
                let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
                assert_eq!(seqs, vec![3, 5], "B's own entry 4 is not sent back");
            }
            other => panic!("expected entries, got {other:?}"),
        }
        b.applied(now, "customers".into(), 5, 2);
        assert_eq!(
            deliver(&mut b, &mut a, now)?,
            0,
            "the ack waits for company"
        );
        let deadline = b.poll_timeout().expect("an ack deadline");
        b.handle_timeout(deadline)?;
        assert_eq!(deliver(&mut b, &mut a, now)?, 1);
        a.log_grew();
        assert_eq!(
            a.wants(),
            vec![("customers".to_owned(), 6, ENTRIES_PER_MESSAGE_MAX)]
        );
        Ok(())
    }

    /// Two sessions past their hellos, B subscribed to A's log of `customers` from
    /// `next` (A's log ends at `head`) and told what B's agent follows.
    fn following_pair(
        now: Instant,
        head: u64,
        next: u64,
        b_follows: &Following,
    ) -> Result<(Session, Session), ProtocolError> {
        let mut a = Session::new([1; 16], vec![("customers".into(), head)], now);
        let mut b = Session::new([2; 16], vec![("customers".into(), 0)], now);
        deliver(&mut a, &mut b, now)?;
        deliver(&mut b, &mut a, now)?;
        a.poll_event();
        b.poll_event();
        b.follow(b_follows);
        b.act(
            now,
            Action::Subscribe {
                cursors: vec![("customers".into(), next)],
                anti_entropy: Vec::new(),
            },
        );
        deliver(&mut b, &mut a, now)?;
        Ok((a, b))
    }

    #[test]
    fn entries_learned_from_a_store_the_peer_follows_are_not_relayed_to_it()
    -> Result<(), ProtocolError> {
        let now = Instant::now();
        let (s_id, t_id) = ([7; 16], [8; 16]);
        let mut b_follows = Following::default();
        b_follows.add(1, s_id, vec!["customers".into()]);
        let (mut a, mut b) = following_pair(now, 0, 1, &b_follows)?;
        let log = vec![
            (1, entry(1, None)),
            (2, entry(2, Some(s_id))),
            (3, entry(3, Some(t_id))),
        ];
        a.send_entries(now, "customers", log, ENTRIES_PER_MESSAGE_MAX);
        deliver(&mut a, &mut b, now)?;
        match b.poll_event() {
            Some(Event::Apply { upto, entries, .. }) => {
                assert_eq!(upto, 3);
                let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
                assert_eq!(seqs, vec![1, 3], "B gets S's entry from S itself");
            }
            other => panic!("expected entries, got {other:?}"),
        }
        // B's agent no longer follows S: A relays S's entries again, and B walks.
        b_follows.remove(1, now);
        b_follows.poll(now + Duration::from_millis(super::super::follow::LOSS_GRACE_MS));
        b.follow(&b_follows);
        let mut frames = Vec::new();
        while let Some(frame) = b.poll_transmit() {
            frames.push(decode(&frame).expect("a message").1);
        }
        assert!(
            matches!(&frames[..], [Message::Following { stores, .. }, Message::DigestQuery { depth: 0, .. }] if stores.is_empty()),
            "the new claim goes before the walk: {frames:?}"
        );
        for message in &frames {
            let frame = encode(a.recv_seq, message);
            a.handle(now, &frame)?;
        }
        a.log_grew();
        a.send_entries(
            now,
            "customers",
            vec![(4, entry(4, Some(s_id)))],
            ENTRIES_PER_MESSAGE_MAX,
        );
        deliver(&mut a, &mut b, now)?;
        match b.poll_event() {
            Some(Event::Apply { entries, .. }) => assert_eq!(entries.len(), 1),
            other => panic!("expected S's entry relayed, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn a_followed_store_that_comes_back_and_catches_up_costs_no_walk() -> Result<(), ProtocolError>
    {
        let now = Instant::now();
        let s_id = [7; 16];
        let mut b_follows = Following::default();
        b_follows.add(1, s_id, vec!["customers".into()]);
        let (_a, mut b) = following_pair(now, 0, 1, &b_follows)?;
        while b.poll_transmit().is_some() {}
        b_follows.remove(1, now);
        b_follows.add(2, s_id, vec!["customers".into()]);
        b_follows.caught_up(s_id);
        b_follows.poll(now + Duration::from_millis(super::super::follow::LOSS_GRACE_MS));
        b.follow(&b_follows);
        while let Some(frame) = b.poll_transmit() {
            let message = decode(&frame).expect("a message").1;
            assert!(
                !matches!(message, Message::DigestQuery { .. }),
                "no walk: {message:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn skipped_entries_still_move_the_peers_cursor_past_the_hello_head() -> Result<(), ProtocolError>
    {
        let now = Instant::now();
        let s_id = [7; 16];
        let mut b_follows = Following::default();
        b_follows.add(1, s_id, vec!["customers".into()]);
        let (mut a, mut b) = following_pair(now, 2, 1, &b_follows)?;
        // Something was sent already, so only the hello head moves the cursor now.
        a.send_entries(now, "customers", vec![(1, entry(1, None))], 1);
        deliver(&mut a, &mut b, now)?;
        b.poll_event();
        assert!(!b.caught_up(), "A's hello head is 2");
        a.send_entries(
            now,
            "customers",
            vec![(2, entry(2, Some(s_id)))],
            ENTRIES_PER_MESSAGE_MAX,
        );
        deliver(&mut a, &mut b, now)?;
        match b.poll_event() {
            Some(Event::Apply { upto, entries, .. }) => {
                assert_eq!(upto, 2);
                assert!(entries.is_empty());
            }
            other => panic!("expected an empty message, got {other:?}"),
        }
        b.applied(now, "customers".into(), 2, 0);
        assert!(b.caught_up());
        // Past the hello head, skipped entries send nothing.
        a.log_grew();
        a.send_entries(
            now,
            "customers",
            vec![(3, entry(3, Some(s_id)))],
            ENTRIES_PER_MESSAGE_MAX,
        );
        assert_eq!(deliver(&mut a, &mut b, now)?, 0);
        Ok(())
    }

    #[test]
    fn only_a_cursor_kept_from_before_walks_once_caught_up() -> Result<(), ProtocolError> {
        let now = Instant::now();
        let digest_queries = |session: &mut Session| {
            let mut n = 0;
            while let Some(frame) = session.poll_transmit() {
                n += usize::from(matches!(
                    decode(&frame).expect("a message").1,
                    Message::DigestQuery { .. }
                ));
            }
            n
        };
        // A log read from its start: nothing skipped before can be missing.
        let (_a, mut b) = following_pair(now, 0, 1, &Following::default())?;
        assert_eq!(digest_queries(&mut b), 0);
        assert!(b.caught_up_walk_done());
        // A cursor persisted before (by an earlier life of this agent, perhaps):
        // walk once caught up with A's hello head.
        let (_a, mut b) = following_pair(now, 5, 4, &Following::default())?;
        assert_eq!(digest_queries(&mut b), 0, "not caught up yet");
        b.act(
            now,
            Action::Applied {
                collection: "customers".into(),
                upto: 5,
                entries: 1,
            },
        );
        assert_eq!(digest_queries(&mut b), 1);
        assert!(!b.caught_up_walk_done());
        // A later session with the same peer in this life skips it.
        let mut walked = Following::default();
        walked.walked([1; 16]);
        let (_a, mut b) = following_pair(now, 5, 5, &walked)?;
        assert_eq!(digest_queries(&mut b), 0);
        Ok(())
    }

    #[test]
    fn flow_control_stops_reading_until_acks_arrive() -> Result<(), ProtocolError> {
        let now = Instant::now();
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        let mut b = Session::new([2; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        deliver(&mut a, &mut b, now)?;
        deliver(&mut b, &mut a, now)?;
        b.subscribe(vec![("c".into(), 1)]);
        deliver(&mut b, &mut a, now)?;
        let mut sent = 0;
        let mut rounds = 0;
        while let Some((_, from, max)) = a.wants().into_iter().next() {
            let read: Vec<_> = (from..from + max as u64)
                .map(|s| (s, entry(1, None)))
                .collect();
            a.send_entries(now, "c", read, max);
            sent += max;
            rounds += 1;
            assert!(
                rounds <= IN_FLIGHT_ENTRIES_MAX,
                "flow control never stopped the reads"
            );
        }
        assert_eq!(sent, IN_FLIGHT_ENTRIES_MAX);
        // Acknowledging the first message opens the window by its entries.
        b.applied(
            now,
            "c".into(),
            ENTRIES_PER_MESSAGE_MAX as u64,
            ACK_ENTRIES_MAX,
        );
        assert_eq!(
            deliver(&mut b, &mut a, now)?,
            1,
            "many entries are acknowledged at once"
        );
        let next = IN_FLIGHT_ENTRIES_MAX as u64 + 1;
        assert_eq!(
            a.wants(),
            vec![("c".to_owned(), next, ENTRIES_PER_MESSAGE_MAX)]
        );
        // A read of only the peer's own entries sends nothing and takes no room.
        while a.poll_transmit().is_some() {}
        let own: Vec<_> = (next..next + 10)
            .map(|s| (s, entry(1, Some([2; 16]))))
            .collect();
        a.send_entries(now, "c", own, ENTRIES_PER_MESSAGE_MAX);
        assert_eq!(a.poll_transmit(), None);
        a.log_grew();
        assert_eq!(
            a.wants(),
            vec![("c".to_owned(), next + 10, ENTRIES_PER_MESSAGE_MAX)]
        );
        Ok(())
    }

    #[test]
    fn protocol_violations_are_errors() {
        let now = Instant::now();
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        assert!(matches!(
            a.handle(now, &[0xff, 0xff, 0xff]),
            Err(ProtocolError::Malformed(_))
        ));
        let ack = encode(
            0,
            &Message::Ack {
                collection: "c".into(),
                upto: 1,
            },
        );
        assert_eq!(
            a.handle(now, &ack),
            Err(ProtocolError::Unexpected("a message before hello"))
        );
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        let hello = encode(
            0,
            &Message::Hello {
                version: PROTOCOL_VERSION + 1,
                store: [2; 16],
                heads: vec![],
            },
        );
        assert_eq!(
            a.handle(now, &hello),
            Err(ProtocolError::Version(PROTOCOL_VERSION + 1))
        );
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        let hello = encode(
            0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                store: [2; 16],
                heads: vec![],
            },
        );
        assert_eq!(a.handle(now, &hello), Ok(()));
        let ack = encode(
            1,
            &Message::Ack {
                collection: "c".into(),
                upto: 1,
            },
        );
        assert_eq!(
            a.handle(now, &ack),
            Err(ProtocolError::Unexpected(
                "ack of a collection not streamed"
            ))
        );
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        a.handle(now, &hello).expect("hello");
        let entries = encode(
            1,
            &Message::Entries {
                collection: "c".into(),
                upto: 1,
                entries: vec![],
            },
        );
        assert!(
            a.handle(now, &entries).is_err(),
            "entries before subscribing"
        );
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        a.handle(now, &hello).expect("hello");
        a.subscribe(vec![("c".into(), 5)]);
        let stale = encode(
            1,
            &Message::Entries {
                collection: "c".into(),
                upto: 9,
                entries: vec![WireEntry {
                    seq: 3,
                    doc: [0; 16],
                    changes: vec![],
                }],
            },
        );
        assert_eq!(
            a.handle(now, &stale),
            Err(ProtocolError::Unexpected("entries out of order"))
        );
    }

    #[test]
    fn a_lost_repeated_or_reordered_message_breaks_the_session() {
        let now = Instant::now();
        let hello = encode(
            0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                store: [2; 16],
                heads: vec![],
            },
        );
        let sub = |seq| encode(seq, &Message::Subscribe { cursors: vec![] });
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        a.handle(now, &hello).expect("hello");
        assert_eq!(
            a.handle(now, &sub(2)),
            Err(ProtocolError::Sequence {
                expected: 1,
                got: 2
            })
        );
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        a.handle(now, &hello).expect("hello");
        assert_eq!(
            a.handle(now, &hello),
            Err(ProtocolError::Sequence {
                expected: 1,
                got: 0
            })
        );
    }

    #[test]
    fn unanswered_entries_and_a_missing_subscription_time_out() -> Result<(), ProtocolError> {
        let now = Instant::now();
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        let mut b = Session::new([2; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        deliver(&mut a, &mut b, now)?;
        deliver(&mut b, &mut a, now)?;
        let deadline = a.poll_timeout().expect("a subscribe deadline");
        assert_eq!(
            a.handle_timeout(deadline),
            Err(ProtocolError::SubscribeTimeout)
        );
        b.subscribe(vec![("c".into(), 1)]);
        deliver(&mut b, &mut a, now)?;
        a.send_entries(now, "c", vec![(1, entry(1, None))], ENTRIES_PER_MESSAGE_MAX);
        let due = now + Duration::from_millis(ACK_TIMEOUT_MS);
        assert_eq!(a.poll_timeout(), Some(due));
        assert_eq!(a.handle_timeout(due - Duration::from_millis(1)), Ok(()));
        assert_eq!(a.handle_timeout(due), Err(ProtocolError::AckTimeout));
        Ok(())
    }

    /// Regression (unsolicited `DocChanges`): repair answers nobody asked for were
    /// accepted for any collection, and each new collection name cost memory. Now
    /// only the answer to the oldest repair request is taken, and requests about a
    /// collection this agent does not sync with the peer are refused.
    #[test]
    fn unsolicited_repairs_and_foreign_collections_are_refused() -> Result<(), ProtocolError> {
        let now = Instant::now();
        let hello = encode(
            0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                store: [2; 16],
                heads: vec![],
            },
        );
        let fresh = || -> Result<Session, ProtocolError> {
            let mut a = Session::new([1; 16], vec![("customers".into(), 0)], now);
            a.handle(now, &hello)?;
            Ok(a)
        };
        let changes = |doc: u8, collection: &str| {
            encode(
                1,
                &Message::DocChanges {
                    collection: collection.into(),
                    doc: [doc; 16],
                    changes: vec![],
                },
            )
        };
        assert_eq!(
            fresh()?.handle(now, &changes(7, "customers")),
            Err(ProtocolError::Unexpected(
                "changes of a document not asked for"
            ))
        );
        let mut a = fresh()?;
        assert!(a.need_doc("customers".into(), [7; 16], vec![]));
        assert_eq!(
            a.handle(now, &changes(8, "customers")),
            Err(ProtocolError::Unexpected(
                "changes of a document not asked for"
            ))
        );
        let mut a = fresh()?;
        assert!(a.need_doc("customers".into(), [7; 16], vec![]));
        assert_eq!(a.handle(now, &changes(7, "customers")), Ok(()));
        for foreign in [
            Message::NeedDoc {
                collection: "secrets".into(),
                doc: [1; 16],
                heads: vec![],
            },
            Message::BucketQuery {
                collection: "secrets".into(),
                bucket: 0,
            },
            Message::DigestQuery {
                collection: "secrets".into(),
                depth: 0,
                prefix: 0,
            },
        ] {
            assert_eq!(
                fresh()?.handle(now, &encode(1, &foreign)),
                Err(ProtocolError::Unexpected(
                    "a request about a collection not synced with this peer"
                )),
                "{foreign:?}"
            );
        }
        // A subscription to a collection not synced here streams nothing.
        let mut a = fresh()?;
        let subscribe = Message::Subscribe {
            cursors: vec![("secrets".into(), 1), ("customers".into(), 1)],
        };
        a.handle(now, &encode(1, &subscribe))?;
        let wanted: Vec<String> = a.wants().into_iter().map(|(c, _, _)| c).collect();
        assert_eq!(wanted, ["customers"]);
        Ok(())
    }

    #[test]
    fn a_silent_peer_times_out() {
        let now = Instant::now();
        let mut a = Session::new([1; 16], vec![("customers".into(), 0), ("c".into(), 0)], now);
        let deadline = a.poll_timeout().expect("a hello deadline");
        assert_eq!(
            a.handle_timeout(deadline - Duration::from_millis(1)),
            Ok(())
        );
        assert_eq!(a.handle_timeout(deadline), Err(ProtocolError::HelloTimeout));
    }
}
