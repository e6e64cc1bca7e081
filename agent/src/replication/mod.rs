//! Replication between agents: a sans-IO session state machine ([`Session`]) and the
//! messages it speaks ([`Message`]). The QUIC driver and a simulator drive the same
//! code: bytes and events in, frames and events out, time passed in.
//!
//! How two agents converge: each agent keeps, per collection, a log of the changes it
//! learned (its own and relayed ones). On connecting, each side tells the other from
//! which seq to stream its log, using the cursor it persisted with the changes it
//! applied; the sender streams from there, then live as its log grows. Entries the
//! receiver itself sent are skipped, and so are entries learned from a store the
//! receiver follows live itself ([`follow`]). Applying is idempotent, so a replay is harmless;
//! catch-up costs what changed while apart. A document left with missing
//! dependencies is repaired by a per-document exchange of heads.
//!
//! The [`policy`] decides what to do with each session event against the engine;
//! it runs inside the core's group commit, for the QUIC driver and the simulator
//! alike.

pub mod follow;
mod message;
pub mod policy;
mod session;

pub use follow::{FollowMap, Following};
pub use message::{Message, decode, encode};
pub use policy::Action;
pub use session::{
    ACK_DELAY_MS, ACK_ENTRIES_MAX, ACK_TIMEOUT_MS, DOC_HEADS_MAX, ENTRIES_PER_MESSAGE_MAX, Event,
    FOLLOWED_STORES_MAX, HELLO_TIMEOUT_MS, IN_FLIGHT_ENTRIES_MAX, MESSAGE_CHANGE_BYTES_MAX,
    NEED_DOCS_IN_FLIGHT_MAX, ProtocolError, SUBSCRIBE_COLLECTIONS_MAX, SUBSCRIBE_TIMEOUT_MS,
    Session, SessionProgress,
};

/// The protocol version spoken; a peer speaking another is refused. Version 2 added
/// [`Message::Following`].
pub const PROTOCOL_VERSION: u16 = 2;
