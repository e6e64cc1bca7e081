//! The peer policy: what an agent does with each event of a session, against its
//! engine, inside the core's group commit.
//!
//! It decides where to subscribe (persisted cursors, anti-entropy marks), applies
//! entries and repairs, answers repair and digest queries, and compares digests.
//! It runs on the core for the QUIC driver and in the simulator alike, so the
//! simulator checks this very code; the driver stays a thin pump between the
//! socket, the [`Session`](super::Session) and the core. The [`Action`]s it returns
//! are applied to the session once the batch is committed, so nothing is sent or
//! acknowledged before it is durable.

use crdt_model::{ChangeHash, DocId};

use super::{Event, Message};
use crate::engine::{Engine, RemoteError, WireEntry};
use crate::store::{Batch, StoreError, StoreId, anti_entropy_mark, peer_cursor};

/// What the session must do after the core committed an event's batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Subscribe to the peer's logs from these cursors, then walk the digest tree of
    /// each collection in `anti_entropy`.
    Subscribe {
        /// (collection, next seq wanted).
        cursors: Vec<(String, u64)>,
        /// Collections whose cursor was lost: compare digests with the peer.
        anti_entropy: Vec<String>,
    },
    /// Entries up to `upto` of `collection` are durable: acknowledge them.
    Applied {
        /// The collection.
        collection: String,
        /// The last seq considered.
        upto: u64,
        /// How many entries.
        entries: usize,
    },
    /// A document waits for changes it lacks: ask the peer.
    Ask {
        /// The collection.
        collection: String,
        /// The document.
        doc: [u8; 16],
        /// Its heads here.
        heads: Vec<[u8; 32]>,
    },
    /// A repaired document's changes are durable.
    Repaired {
        /// The document.
        doc: [u8; 16],
    },
    /// Answer one of the peer's queries (`Digests`, `Bucket` or `DocChanges`).
    Answer(Message),
    /// Query the children whose digests differ.
    CompareDigests {
        /// The collection.
        collection: String,
        /// The node's depth.
        depth: u8,
        /// The node's prefix.
        prefix: u32,
        /// The peer's digests.
        theirs: Vec<u64>,
        /// Ours.
        ours: Vec<u64>,
    },
    /// Anti-entropy found a document whose heads differ: repair it.
    Repair {
        /// The collection.
        collection: String,
        /// The document.
        doc: [u8; 16],
        /// Its heads here.
        heads: Vec<[u8; 32]>,
    },
    /// A bucket of the anti-entropy walk was handled.
    Answered {
        /// The collection.
        collection: String,
    },
}

/// Where to subscribe to the peer's log of a collection, and whether to walk its
/// digest tree first, given the persisted `cursor` (0: none), whether an earlier walk
/// was cut short (`marked`), whether this store holds documents of the collection,
/// and the peer's log head from its hello. A store with documents but no cursor (lost,
/// or a new peer store) streams from the peer's head and repairs the rest by digests
/// instead of replaying the peer's whole log.
pub fn subscription(cursor: u64, marked: bool, holds_docs: bool, peer_head: u64) -> (u64, bool) {
    if marked || (cursor == 0 && holds_docs) {
        (cursor.max(peer_head + 1), true)
    } else {
        (cursor, false)
    }
}

/// Acts on one session `event` of the session with peer store `peer`, staging into
/// `batch`; returns what the session must do once the batch is committed. A
/// [`RemoteError`] other than `Store` means the peer sent bad data: close its session.
pub fn on_event(
    engine: &mut Engine,
    batch: &mut Batch,
    peer: StoreId,
    event: Event,
) -> Result<Vec<Action>, RemoteError> {
    let actions = match event {
        Event::PeerHello { store, heads } => vec![hello(engine, batch, store, &heads)?],
        Event::Apply {
            collection,
            upto,
            entries,
        } => {
            let count = entries.len();
            let _span = tracing::info_span!("collection", %collection).entered();
            let outcome = engine.apply_remote(batch, peer, &collection, Some(upto), entries)?;
            let mut actions = vec![Action::Applied {
                collection: collection.clone(),
                upto,
                entries: count,
            }];
            for doc in outcome.missing {
                actions.push(Action::Ask {
                    collection: collection.clone(),
                    doc: doc.0,
                    heads: heads(engine, doc)?,
                });
            }
            actions
        }
        Event::DocChanges {
            collection,
            doc,
            changes,
        } => {
            let entry = WireEntry {
                seq: 0,
                doc,
                changes,
            };
            engine.apply_remote(batch, peer, &collection, None, vec![entry])?;
            vec![Action::Repaired { doc }]
        }
        Event::NeedDoc {
            collection,
            doc,
            heads,
        } => {
            let heads: Vec<ChangeHash> = heads.into_iter().map(ChangeHash).collect();
            let changes = engine
                .changes_since(&collection, DocId(doc), &heads)?
                .map(|found| found.changes)
                .unwrap_or_default();
            vec![Action::Answer(Message::DocChanges {
                collection,
                doc,
                changes,
            })]
        }
        Event::DigestQuery {
            collection,
            depth,
            prefix,
        } => {
            let digests = engine
                .store()
                .digest_children(&collection, depth, prefix)?
                .unwrap_or_default();
            vec![Action::Answer(Message::Digests {
                collection,
                depth,
                prefix,
                digests,
            })]
        }
        Event::BucketQuery { collection, bucket } => {
            let docs = engine.store().bucket_docs(&collection, bucket)?;
            vec![Action::Answer(Message::Bucket {
                collection,
                bucket,
                docs,
            })]
        }
        Event::Digests {
            collection,
            depth,
            prefix,
            digests,
        } => {
            let ours = engine
                .store()
                .digest_children(&collection, depth, prefix)?
                .unwrap_or_default();
            vec![Action::CompareDigests {
                collection,
                depth,
                prefix,
                theirs: digests,
                ours,
            }]
        }
        Event::Bucket {
            collection,
            bucket: _,
            docs,
        } => {
            let mut actions = Vec::new();
            for (doc, theirs) in docs {
                if engine.store().doc_digest(&collection, DocId(doc))? != theirs {
                    actions.push(Action::Repair {
                        collection: collection.clone(),
                        doc,
                        heads: heads(engine, DocId(doc))?,
                    });
                }
            }
            actions.push(Action::Answered { collection });
            actions
        }
        Event::AntiEntropyDone { collection } => {
            tracing::info!(%collection, "anti-entropy finished");
            let mark = anti_entropy_mark(&peer, &collection);
            engine.store().stage_cursor(batch, &mark, 0);
            Vec::new()
        }
    };
    Ok(actions)
}

/// The subscription answering the peer's hello; marks collections whose walk starts.
fn hello(
    engine: &mut Engine,
    batch: &mut Batch,
    peer: StoreId,
    peer_heads: &[(String, u64)],
) -> Result<Action, StoreError> {
    let collections: Vec<String> = engine.collections().map(str::to_owned).collect();
    let mut cursors = Vec::with_capacity(collections.len());
    let mut anti_entropy = Vec::new();
    for collection in collections {
        let name = peer_cursor(&peer, &collection);
        let mark = anti_entropy_mark(&peer, &collection);
        let peer_head = peer_heads
            .iter()
            .find(|(c, _)| *c == collection)
            .map_or(0, |(_, head)| *head);
        let store = engine.store();
        let (cursor, walk) = subscription(
            store.cursor(&name)?,
            store.cursor(&mark)? == 1,
            store.log_head(&collection)? > 0,
            peer_head,
        );
        if walk {
            store.stage_cursor(batch, &name, cursor);
            store.stage_cursor(batch, &mark, 1);
            tracing::info!(%collection, "cursor lost: comparing digests with the peer");
            anti_entropy.push(collection.clone());
        }
        cursors.push((collection, cursor));
    }
    Ok(Action::Subscribe {
        cursors,
        anti_entropy,
    })
}

fn heads(engine: &mut Engine, doc: DocId) -> Result<Vec<[u8; 32]>, StoreError> {
    Ok(engine.heads(doc)?.iter().map(|h| h.0).collect())
}
