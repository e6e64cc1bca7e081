//! The messages of the replication protocol and their encoding (postcard).

use serde::{Deserialize, Serialize};

use crate::engine::WireEntry;

/// One message of the replication protocol; each travels in one frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First message of each side.
    Hello {
        /// The protocol version spoken.
        version: u16,
        /// The sender's store id (its actor id).
        store: [u8; 16],
        /// The last seq of each of the sender's collection logs.
        heads: Vec<(String, u64)>,
    },
    /// "Stream me your log of each collection from this seq on."
    Subscribe {
        /// (collection, next seq wanted).
        cursors: Vec<(String, u64)>,
    },
    /// Entries of the sender's log; every seq up to `upto` was considered.
    Entries {
        /// The collection.
        collection: String,
        /// The last seq considered (entries the receiver sent itself are skipped).
        upto: u64,
        /// The entries.
        entries: Vec<WireEntry>,
    },
    /// The receiver persisted everything up to `upto` of `collection`.
    Ack {
        /// The collection.
        collection: String,
        /// The last seq persisted.
        upto: u64,
    },
    /// "I hold these heads of this document; send what I lack." Always answered,
    /// with no changes if there are none.
    NeedDoc {
        /// The document's collection.
        collection: String,
        /// The document.
        doc: [u8; 16],
        /// The sender's heads of it.
        heads: Vec<[u8; 32]>,
    },
    /// "Send me the digests of the children of this node of your digest tree" (see
    /// `store::DIGEST_LEVEL_BITS`): the start of anti-entropy, for a peer whose
    /// cursor into the sender's log was lost.
    DigestQuery {
        /// The collection.
        collection: String,
        /// Bits of the node's prefix: 0, 6 or 12.
        depth: u8,
        /// The node's prefix.
        prefix: u32,
    },
    /// The answer to [`Message::DigestQuery`].
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
    /// "Send me the documents of this bucket with their heads digests."
    BucketQuery {
        /// The collection.
        collection: String,
        /// The bucket (the first 16 bits of the document ids).
        bucket: u16,
    },
    /// The answer to [`Message::BucketQuery`].
    Bucket {
        /// The collection.
        collection: String,
        /// The bucket.
        bucket: u16,
        /// (document id, heads digest) of each document in it.
        docs: Vec<([u8; 16], u64)>,
    },
    /// "I follow these stores' logs of `collection` live": do not relay to me the
    /// entries you learned from them. Replaces what the sender said before.
    Following {
        /// The collection.
        collection: String,
        /// The stores followed.
        stores: Vec<[u8; 16]>,
    },
    /// Changes of one document, answering [`Message::NeedDoc`].
    DocChanges {
        /// The collection of the document.
        collection: String,
        /// The document.
        doc: [u8; 16],
        /// Automerge change bytes.
        changes: Vec<Vec<u8>>,
    },
}

/// Encodes the `seq`-th message of a session into frame bytes. Numbering every
/// message lets the receiver notice one lost, repeated or reordered.
pub fn encode(seq: u64, message: &Message) -> Vec<u8> {
    postcard::to_stdvec(&(seq, message)).expect("in-memory messages always encode")
}

/// Decodes frame bytes into a message and its number.
pub fn decode(bytes: &[u8]) -> Result<(u64, Message), postcard::Error> {
    postcard::from_bytes(bytes)
}
