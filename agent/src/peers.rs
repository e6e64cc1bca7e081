//! Peer connections: dialing, accepting, and one driver task per connection that
//! owns that peer's [`Session`] and feeds it frames, time and the store's answers.
//!
//! Two agents that dial each other at once end up with two connections; both sides
//! keep the one dialed by the smaller peer id and close the other.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crdt_model::{ChangeHash, DocId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::core::{CoreHandle, CoreRequest};
use crate::engine::{ApplyOutcome, WireEntry};
use crate::identity::PeerId;
use crate::replication::{Event, ProtocolError, Session};
use crate::store::{StoreId, StoreReader};
use crate::transport::{FrameError, Transport, read_frame, write_frame};

/// Frames read ahead of the session per connection at most.
pub const INBOUND_FRAMES_MAX: usize = 16;
/// Entry batches handed to the core and not yet durable, per connection, at most.
pub const APPLIES_IN_FLIGHT_MAX: usize = 8;
/// Shortest and longest wait between dial attempts.
pub const DIAL_RETRY_MIN_MS: u64 = 100;
/// See [`DIAL_RETRY_MIN_MS`].
pub const DIAL_RETRY_MAX_MS: u64 = 2_000;

/// What every connection driver shares.
#[derive(Debug)]
pub struct PeerContext {
    /// This agent's peer id.
    pub me: PeerId,
    /// This agent's store id.
    pub store: StoreId,
    /// The collections this agent replicates.
    pub collections: Vec<String>,
    /// The core.
    pub core: CoreHandle,
    /// Log and cursor reads.
    pub reader: StoreReader,
    /// Bumped when the log grows.
    pub log_version: watch::Receiver<u64>,
    /// Live connections by peer.
    pub registry: Registry,
    /// Set to stop every driver.
    pub shutdown: watch::Receiver<bool>,
}

/// The live connections, one preferred per peer.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<HashMap<PeerId, Vec<Live>>>,
    next_id: AtomicU64,
}

#[derive(Debug, Clone)]
struct Live {
    id: u64,
    dialer: PeerId,
    connection: quinn::Connection,
}

impl Registry {
    fn add(&self, me: PeerId, peer: PeerId, dialer: PeerId, connection: quinn::Connection) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.lock().expect("registry lock");
        let lives = inner.entry(peer).or_default();
        lives.push(Live {
            id,
            dialer,
            connection,
        });
        if lives.len() > 1 {
            // Keep the connection dialed by the smaller id; both sides agree on it.
            let preferred = me.min(peer);
            if let Some(keep) = lives.iter().rposition(|l| l.dialer == preferred) {
                let keep = lives[keep].id;
                for live in lives.iter().filter(|l| l.id != keep) {
                    live.connection.close(0u32.into(), b"duplicate connection");
                }
            }
        }
        id
    }

    fn remove(&self, peer: PeerId, id: u64) {
        let mut inner = self.inner.lock().expect("registry lock");
        if let Some(lives) = inner.get_mut(&peer) {
            lives.retain(|l| l.id != id);
            if lives.is_empty() {
                inner.remove(&peer);
            }
        }
    }

    /// Whether a connection to `peer` is live.
    pub fn connected(&self, peer: &PeerId) -> bool {
        self.inner.lock().expect("registry lock").contains_key(peer)
    }

    /// The peers with a live connection.
    pub fn peers(&self) -> Vec<PeerId> {
        self.inner
            .lock()
            .expect("registry lock")
            .keys()
            .copied()
            .collect()
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum DriveError {
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("peer sent bad entries: {0}")]
    Refused(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the agent is stopping")]
    Stopping,
}

/// Accepts peers until the transport closes.
pub async fn accept_loop(transport: Arc<Transport>, ctx: Arc<PeerContext>) {
    while let Some(result) = transport.accept().await {
        match result {
            Ok((connection, peer)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move { run_connection(connection, peer, peer, ctx).await });
            }
            Err(e) => tracing::warn!(error = %e, "refused an incoming connection"),
        }
    }
}

/// Keeps a connection to `peer` at `addr` up, redialing with backoff.
pub async fn dial_loop(
    transport: Arc<Transport>,
    peer: PeerId,
    addr: SocketAddr,
    ctx: Arc<PeerContext>,
) {
    let mut delay = DIAL_RETRY_MIN_MS;
    let mut shutdown = ctx.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !ctx.registry.connected(&peer) {
            match transport.connect(addr, peer).await {
                Ok(connection) => {
                    delay = DIAL_RETRY_MIN_MS;
                    run_connection(connection, peer, ctx.me, ctx.clone()).await;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(%peer, %addr, error = %e, "dial failed");
                    delay = (delay * 2).min(DIAL_RETRY_MAX_MS);
                }
            }
        } else {
            delay = DIAL_RETRY_MIN_MS * 5;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn run_connection(
    connection: quinn::Connection,
    peer: PeerId,
    dialer: PeerId,
    ctx: Arc<PeerContext>,
) {
    let id = ctx.registry.add(ctx.me, peer, dialer, connection.clone());
    let dialed = dialer == ctx.me;
    tracing::info!(%peer, remote = %connection.remote_address(), dialed, "peer connected");
    let result = drive(&connection, dialed, &ctx).await;
    ctx.registry.remove(peer, id);
    match result {
        Err(DriveError::Stopping) => connection.close(0u32.into(), b"agent stopping"),
        Err(DriveError::Connection(e)) => tracing::info!(%peer, reason = %e, "peer disconnected"),
        Err(DriveError::Frame(e)) if connection.close_reason().is_some() => {
            tracing::info!(%peer, reason = %e, "peer disconnected")
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "closing the session with this peer");
            connection.close(1u32.into(), e.to_string().as_bytes());
        }
        Ok(()) => {}
    }
}

struct PendingApply {
    collection: String,
    upto: Option<u64>,
    entries: usize,
    /// The document of a repair.
    doc: Option<[u8; 16]>,
    reply: oneshot::Receiver<Result<ApplyOutcome, String>>,
}

async fn drive(
    connection: &quinn::Connection,
    dialed: bool,
    ctx: &PeerContext,
) -> Result<(), DriveError> {
    let (mut send, mut recv) = if dialed {
        connection.open_bi().await?
    } else {
        connection.accept_bi().await?
    };
    let (frames_tx, mut frames_rx) =
        mpsc::channel::<Result<Vec<u8>, FrameError>>(INBOUND_FRAMES_MAX);
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = Vec::new();
            let result = match read_frame(&mut recv, &mut buf).await {
                Ok(true) => Ok(buf),
                Ok(false) => Err(FrameError::Truncated {
                    expected: 4,
                    received: 0,
                }),
                Err(e) => Err(e),
            };
            let end = result.is_err();
            if frames_tx.send(result).await.is_err() || end {
                return;
            }
        }
    });
    let _reader_guard = AbortOnDrop(reader);
    let mut heads = Vec::with_capacity(ctx.collections.len());
    for collection in &ctx.collections {
        heads.push((collection.clone(), ctx.reader.log_head(collection)?));
    }
    let mut session = Session::new(ctx.store, heads, Instant::now());
    let mut pending: VecDeque<PendingApply> = VecDeque::new();
    let mut log_version = ctx.log_version.clone();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        while let Some(event) = session.poll_event() {
            handle_event(&mut session, event, ctx, &mut pending).await?;
        }
        for (collection, from, max) in session.wants() {
            let read = ctx.reader.log_from(&collection, from, max)?;
            session.send_entries(Instant::now(), &collection, read, max);
        }
        while let Some(frame) = session.poll_transmit() {
            write_frame(&mut send, &frame).await?;
        }
        let more_to_read = !session.wants().is_empty();
        let timeout = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Err(DriveError::Stopping),
            reply = async { (&mut pending.front_mut().expect("guarded").reply).await }, if !pending.is_empty() => {
                let done = pending.pop_front().expect("guarded");
                let outcome = reply.map_err(|_| DriveError::Stopping)?.map_err(DriveError::Refused)?;
                match done.upto {
                    Some(upto) => session.applied(Instant::now(), done.collection.clone(), upto, done.entries),
                    None => {
                        if let Some(doc) = done.doc {
                            session.repaired(doc);
                        }
                    }
                }
                for doc in outcome.missing {
                    let heads = heads_of(ctx, DocId(doc.0)).await?;
                    session.need_doc(done.collection.clone(), doc.0, heads.iter().map(|h| h.0).collect());
                }
            }
            frame = frames_rx.recv(), if pending.len() < APPLIES_IN_FLIGHT_MAX => {
                let frame = frame.ok_or(DriveError::Stopping)??;
                session.handle(Instant::now(), &frame)?;
            }
            _ = log_version.changed() => session.log_grew(),
            _ = tokio::time::sleep_until(timeout.into()) => session.handle_timeout(Instant::now())?,
            _ = async {}, if more_to_read => {}
        }
    }
}

async fn handle_event(
    session: &mut Session,
    event: Event,
    ctx: &PeerContext,
    pending: &mut VecDeque<PendingApply>,
) -> Result<(), DriveError> {
    match event {
        Event::PeerHello { store } => {
            let mut cursors = Vec::with_capacity(ctx.collections.len());
            let mut anti_entropy = Vec::new();
            let mut marks = Vec::new();
            for collection in &ctx.collections {
                let name = crate::store::peer_cursor(&store, collection);
                let mark = crate::store::anti_entropy_mark(&store, collection);
                let (cursor, walk) = session.subscription(
                    collection,
                    ctx.reader.cursor(&name)?,
                    ctx.reader.cursor(&mark)? == 1,
                    ctx.reader.log_head(collection)? > 0,
                );
                if walk {
                    marks.push((name, cursor));
                    marks.push((mark, 1));
                    anti_entropy.push(collection.clone());
                }
                cursors.push((collection.clone(), cursor));
            }
            if !marks.is_empty() {
                set_cursors(ctx, marks).await?;
            }
            session.subscribe(cursors);
            for collection in anti_entropy {
                tracing::info!(%collection, "cursor lost: comparing digests with the peer");
                session.start_anti_entropy(collection);
            }
        }
        Event::DigestQuery {
            collection,
            depth,
            prefix,
        } => {
            let digests = digest_children(ctx, &collection, depth, prefix).await?;
            let digests =
                digests.ok_or(ProtocolError::Unexpected("a digest query outside the tree"))?;
            session.digests(collection, depth, prefix, digests);
        }
        Event::BucketQuery { collection, bucket } => {
            let docs = ctx.reader.bucket_docs(&collection, bucket)?;
            session.bucket(collection, bucket, docs);
        }
        Event::Digests {
            collection,
            depth,
            prefix,
            digests,
        } => {
            let ours = digest_children(ctx, &collection, depth, prefix).await?;
            let ours = ours.ok_or(ProtocolError::Unexpected("digests outside the tree"))?;
            session.compare_digests(&collection, depth, prefix, &digests, &ours);
        }
        Event::Bucket {
            collection,
            bucket: _,
            docs,
        } => {
            for (doc, theirs) in docs {
                if ctx.reader.doc_digest(&collection, DocId(doc))? != theirs {
                    let heads = heads_of(ctx, DocId(doc)).await?;
                    session.repair(collection.clone(), doc, heads.iter().map(|h| h.0).collect());
                }
            }
            session.answered(&collection);
        }
        Event::AntiEntropyDone { collection } => {
            if let Some(store) = session.peer() {
                tracing::info!(%collection, "anti-entropy finished");
                set_cursors(
                    ctx,
                    vec![(crate::store::anti_entropy_mark(&store, &collection), 0)],
                )
                .await?;
            }
        }
        Event::Apply {
            collection,
            upto,
            entries,
        } => {
            apply(session, ctx, pending, collection, Some(upto), entries).await?;
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
            apply(session, ctx, pending, collection, None, vec![entry]).await?;
            if let Some(last) = pending.back_mut() {
                last.doc = Some(doc);
            }
        }
        Event::NeedDoc {
            collection,
            doc,
            heads,
        } => {
            let (reply, answer) = oneshot::channel();
            let heads = heads.into_iter().map(ChangeHash).collect();
            ctx.core
                .send(CoreRequest::ChangesSince {
                    doc: DocId(doc),
                    heads,
                    reply,
                })
                .await
                .map_err(|_| DriveError::Stopping)?;
            // Always answered, with nothing when the document is unknown here.
            match answer.await.map_err(|_| DriveError::Stopping)? {
                Some(found) => session.doc_changes(found.collection, doc, found.changes),
                None => session.doc_changes(collection, doc, Vec::new()),
            }
        }
    }
    Ok(())
}

async fn apply(
    session: &Session,
    ctx: &PeerContext,
    pending: &mut VecDeque<PendingApply>,
    collection: String,
    upto: Option<u64>,
    entries: Vec<WireEntry>,
) -> Result<(), DriveError> {
    let origin = session
        .peer()
        .ok_or(ProtocolError::Unexpected("entries before hello"))?;
    let (reply, answer) = oneshot::channel();
    let count = entries.len();
    let request = CoreRequest::Apply {
        origin,
        collection: collection.clone(),
        upto,
        entries,
        reply,
    };
    ctx.core
        .send(request)
        .await
        .map_err(|_| DriveError::Stopping)?;
    pending.push_back(PendingApply {
        collection,
        upto,
        entries: count,
        doc: None,
        reply: answer,
    });
    Ok(())
}

async fn digest_children(
    ctx: &PeerContext,
    collection: &str,
    depth: u8,
    prefix: u32,
) -> Result<Option<Vec<u64>>, DriveError> {
    let (reply, answer) = oneshot::channel();
    let request = CoreRequest::DigestChildren {
        collection: collection.to_owned(),
        depth,
        prefix,
        reply,
    };
    ctx.core
        .send(request)
        .await
        .map_err(|_| DriveError::Stopping)?;
    answer.await.map_err(|_| DriveError::Stopping)
}

async fn set_cursors(ctx: &PeerContext, cursors: Vec<(String, u64)>) -> Result<(), DriveError> {
    let (reply, answer) = oneshot::channel();
    ctx.core
        .send(CoreRequest::SetCursors { cursors, reply })
        .await
        .map_err(|_| DriveError::Stopping)?;
    answer.await.map_err(|_| DriveError::Stopping)
}

async fn heads_of(ctx: &PeerContext, doc: DocId) -> Result<Vec<ChangeHash>, DriveError> {
    let (reply, answer) = oneshot::channel();
    ctx.core
        .send(CoreRequest::Heads { doc, reply })
        .await
        .map_err(|_| DriveError::Stopping)?;
    answer.await.map_err(|_| DriveError::Stopping)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
