//! Peer connections: dialing, accepting, and one driver task per connection that
//! pumps frames between the QUIC stream, that peer's [`Session`] and the core.
//!
//! The driver is a thin pump: what to do with each session event (where to
//! subscribe, applying, repairing, answering) is the peer policy, which the core
//! runs (`replication::policy`); the simulator drives the same session and policy.
//!
//! Two agents that dial each other at once end up with two connections; both sides
//! keep the one dialed by the smaller peer id and close the other.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::core::{CoreHandle, CoreRequest};
use crate::engine::RemoteError;
use crate::identity::PeerId;
use crate::logs::RepeatLimiter;
use crate::progress::Progress;
use crate::replication::{Action, Following, ProtocolError, Session};
use crate::store::{StoreId, StoreReader};
use crate::telemetry::{StreamProgress, Telemetry};
use crate::transport::{FrameError, Transport, TransportError, read_frame, write_frame};

/// Frames read ahead of the session per connection at most.
pub const INBOUND_FRAMES_MAX: usize = 16;
/// Session events handed to the core and not yet answered, per connection, at most.
pub const EVENTS_IN_FLIGHT_MAX: usize = 8;
/// Shortest and longest wait between dial attempts.
pub const DIAL_RETRY_MIN_MS: u64 = 100;
/// See [`DIAL_RETRY_MIN_MS`].
pub const DIAL_RETRY_MAX_MS: u64 = 5_000;
/// The application close code of a connection closed because the peer misbehaved.
pub const CLOSE_CODE_REFUSED: u32 = 1;
/// The application close code of the connection dropped for a duplicate.
pub const CLOSE_CODE_DUPLICATE: u32 = 2;

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
    /// Log reads.
    pub reader: StoreReader,
    /// Bumped when the log grows.
    pub log_version: watch::Receiver<u64>,
    /// Live connections by peer.
    pub registry: Registry,
    /// The stores whose logs this agent follows live, told to every peer.
    pub following: SharedFollowing,
    /// Set to stop every driver.
    pub shutdown: watch::Receiver<bool>,
    /// Dial attempts made, for status and tests.
    pub dials: AtomicU64,
    /// Where each session reports its peer's status.
    pub telemetry: Arc<Telemetry>,
}

/// How often a session reports its progress while busy, at most (it reports
/// whenever it goes idle, and when it ends).
pub const REPORT_INTERVAL_MS: u64 = 50;

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
                    live.connection
                        .close(CLOSE_CODE_DUPLICATE.into(), b"duplicate connection");
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

/// The agent's [`Following`], shared by its sessions: each session adds itself once
/// it subscribed and removes itself when it ends; every session watches the version.
#[derive(Debug)]
pub struct SharedFollowing {
    inner: Mutex<Following>,
    version: watch::Sender<u64>,
}

impl Default for SharedFollowing {
    fn default() -> SharedFollowing {
        SharedFollowing {
            inner: Mutex::new(Following::default()),
            version: watch::Sender::new(0),
        }
    }
}

impl SharedFollowing {
    fn update(&self, change: impl FnOnce(&mut Following)) {
        let mut inner = self.inner.lock().expect("following lock");
        change(&mut inner);
        let version = inner.version();
        self.version
            .send_if_modified(|v| std::mem::replace(v, version) != version);
    }

    fn deadline(&self) -> Option<Instant> {
        self.inner.lock().expect("following lock").deadline()
    }

    fn tell(&self, session: &mut Session) {
        session.follow(&self.inner.lock().expect("following lock"));
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
    #[error("the peer sent bad data: {0}")]
    Refused(RemoteError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the agent is stopping")]
    Stopping,
}

/// Accepts peers until the transport closes. Refusals are logged at most once a
/// minute per kind and address, with a count of those not logged.
pub async fn accept_loop(transport: Arc<Transport>, ctx: Arc<PeerContext>) {
    let mut refusals = RepeatLimiter::default();
    while let Some(result) = transport.accept().await {
        match result {
            Ok((connection, peer)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move { run_connection(connection, peer, peer, ctx).await });
            }
            Err(e) => {
                let key = refusal_key(&e);
                if let Some(suppressed) = refusals.allow(key, Instant::now()) {
                    tracing::warn!(suppressed, "refused a connection: {e}");
                }
            }
        }
    }
}

/// What a refusal is grouped by in the logs.
fn refusal_key(error: &TransportError) -> String {
    match error {
        TransportError::NotPinned { peer, .. } => format!("not pinned {peer}"),
        TransportError::Handshake { addr, .. } => format!("handshake {}", addr.ip()),
        other => format!("{:?}", std::mem::discriminant(other)),
    }
}

/// Keeps a connection to `peer` at `addr` up, redialing with backoff. A connection
/// that ends before the session was established (the peer refused us, or broke the
/// protocol) counts as a failure like any other: the wait doubles.
pub async fn dial_loop(
    transport: Arc<Transport>,
    peer: PeerId,
    addr: SocketAddr,
    ctx: Arc<PeerContext>,
) {
    let mut delay = DIAL_RETRY_MIN_MS;
    let mut failures = RepeatLimiter::default();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            return;
        }
        if ctx.registry.connected(&peer) {
            delay = DIAL_RETRY_MIN_MS * 5;
        } else {
            ctx.dials.fetch_add(1, Ordering::Relaxed);
            let established = match transport.connect(addr, peer).await {
                Ok(connection) => run_connection(connection, peer, ctx.me, ctx.clone()).await,
                Err(e) => {
                    if let Some(suppressed) = failures.allow(format!("{peer}"), Instant::now()) {
                        tracing::info!(%peer, %addr, suppressed, "could not reach the peer: {e}");
                    }
                    false
                }
            };
            delay = if established {
                DIAL_RETRY_MIN_MS
            } else {
                (delay * 2).min(DIAL_RETRY_MAX_MS)
            };
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Drives one connection until it ends; returns whether the session was established
/// (the peer said hello).
async fn run_connection(
    connection: quinn::Connection,
    peer: PeerId,
    dialer: PeerId,
    ctx: Arc<PeerContext>,
) -> bool {
    // The span follows the task across threads (an entered guard would not).
    let span = tracing::info_span!("peer", %peer);
    run_connection_in_span(connection, peer, dialer, ctx)
        .instrument(span)
        .await
}

async fn run_connection_in_span(
    connection: quinn::Connection,
    peer: PeerId,
    dialer: PeerId,
    ctx: Arc<PeerContext>,
) -> bool {
    let id = ctx.registry.add(ctx.me, peer, dialer, connection.clone());
    let dialed = dialer == ctx.me;
    tracing::debug!(remote = %connection.remote_address(), dialed, "connection open");
    let mut established = false;
    let mut reporter = Reporter::new(&ctx.telemetry, peer, &connection);
    let result = drive(
        &connection,
        dialed,
        id,
        &ctx,
        &mut established,
        &mut reporter,
    )
    .await;
    ctx.following.update(|f| f.remove(id, Instant::now()));
    ctx.registry.remove(peer, id);
    reporter.ended(&result);
    let duplicate = matches!(
        connection.close_reason(),
        Some(quinn::ConnectionError::LocallyClosed)
    ) || matches!(
        connection.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code == CLOSE_CODE_DUPLICATE.into()
    );
    match result {
        Err(DriveError::Stopping) => connection.close(0u32.into(), b"agent stopping"),
        Err(_) if duplicate => {
            tracing::debug!("closed a duplicate connection; the other one stays");
        }
        Err(DriveError::Connection(e)) => {
            if established {
                tracing::info!(reason = %e, "peer disconnected");
            } else {
                tracing::info!(reason = %e, "the peer closed the connection before saying hello");
            }
        }
        Err(DriveError::Frame(e)) if connection.close_reason().is_some() => {
            tracing::info!(reason = %e, "peer disconnected");
        }
        Err(e) => {
            tracing::warn!(error = %e, "closing the session with this peer");
            connection.close(CLOSE_CODE_REFUSED.into(), e.to_string().as_bytes());
        }
        Ok(()) => {}
    }
    established
}

/// An instant no timer reaches.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// A session event handed to the core, awaiting its actions.
type PendingEvent = oneshot::Receiver<Result<Vec<Action>, RemoteError>>;

async fn drive(
    connection: &quinn::Connection,
    dialed: bool,
    id: u64,
    ctx: &PeerContext,
    established: &mut bool,
    reporter: &mut Reporter<'_>,
) -> Result<(), DriveError> {
    let (send, recv) = if dialed {
        connection.open_bi().await?
    } else {
        connection.accept_bi().await?
    };
    let (frames_tx, mut frames_rx) =
        mpsc::channel::<Result<Vec<u8>, FrameError>>(INBOUND_FRAMES_MAX);
    let _reader = AbortOnDropHandle::new(tokio::spawn(read_frames(recv, frames_tx)));
    let mut heads = Vec::with_capacity(ctx.collections.len());
    for collection in &ctx.collections {
        heads.push((collection.clone(), ctx.reader.log_head(collection)?));
    }
    let mut session = Session::new(ctx.store, heads, Instant::now());
    let result = pump(
        &mut session,
        &mut frames_rx,
        Writer::Idle(send),
        id,
        ctx,
        established,
        reporter,
    )
    .await;
    reporter.report(&mut session, true);
    result
}

/// The write of one frame, which gives the stream back.
type Write = Pin<Box<dyn Future<Output = (quinn::SendStream, Result<(), FrameError>)> + Send>>;

/// The writing side of a connection's stream: idle, or writing one frame. The pump
/// polls a write alongside everything else, so it keeps reading while a write
/// waits for the peer.
enum Writer {
    Idle(quinn::SendStream),
    Busy(Write),
    /// Only between the two.
    Gone,
}

impl Writer {
    /// Starts writing `frame`; the writer is idle.
    fn start(&mut self, frame: Vec<u8>) {
        let Writer::Idle(mut send) = std::mem::replace(self, Writer::Gone) else {
            unreachable!("a frame is only started on an idle writer");
        };
        *self = Writer::Busy(Box::pin(async move {
            let written = write_frame(&mut send, &frame).await;
            (send, written)
        }));
    }

    fn busy(&self) -> bool {
        matches!(self, Writer::Busy(_))
    }

    /// Waits for the frame being written; never ready while idle.
    async fn written(&mut self) -> (quinn::SendStream, Result<(), FrameError>) {
        match self {
            Writer::Busy(write) => write.await,
            _ => std::future::pending().await,
        }
    }

    /// Writes the session's frames while the stream takes them at once, and leaves
    /// the first that must wait in progress.
    async fn write_ready(&mut self, session: &mut Session) -> Result<(), FrameError> {
        loop {
            match self {
                Writer::Busy(write) => {
                    let Poll::Ready((send, written)) =
                        std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await
                    else {
                        return Ok(());
                    };
                    written?;
                    *self = Writer::Idle(send);
                }
                Writer::Idle(_) => match session.poll_transmit() {
                    Some(frame) => self.start(frame),
                    None => return Ok(()),
                },
                Writer::Gone => unreachable!("the writer is never left gone"),
            }
        }
    }
}

/// Moves frames, events and log reads between the session, the stream and the core
/// until the session ends.
///
/// The pump never waits on a write: a frame the stream cannot take yet stays in
/// progress (`writer`) while frames keep being read, and no log is read until it is
/// written. Two agents each writing more than the other buffers would otherwise
/// both wait to write with neither reading, and stop for good.
async fn pump(
    session: &mut Session,
    frames_rx: &mut mpsc::Receiver<Result<Vec<u8>, FrameError>>,
    mut writer: Writer,
    id: u64,
    ctx: &PeerContext,
    established: &mut bool,
    reporter: &mut Reporter<'_>,
) -> Result<(), DriveError> {
    let mut pending: VecDeque<PendingEvent> = VecDeque::new();
    let mut log_version = ctx.log_version.clone();
    let mut shutdown = ctx.shutdown.clone();
    let mut following = ctx.following.version.subscribe();
    // Whether this session follows the peer's logs, and whether it told the peer
    // what this agent follows since the hello.
    let mut follows = false;
    let mut told = false;
    let mut walked = false;
    let mut caught_up = false;
    loop {
        if !follows && let Some((peer, collections)) = session.following() {
            follows = true;
            let collections = collections.to_vec();
            ctx.following.update(|f| f.add(id, peer, collections));
        }
        if !told && session.peer().is_some() {
            told = true;
            following.mark_unchanged();
            ctx.following.tell(session);
        }
        if !caught_up
            && session.caught_up()
            && let Some(peer) = session.peer()
        {
            caught_up = true;
            ctx.following.update(|f| f.caught_up(peer));
        }
        if !walked
            && session.caught_up_walk_done()
            && let Some(peer) = session.peer()
        {
            walked = true;
            ctx.following.update(|f| f.walked(peer));
        }
        while let Some(event) = session.poll_event() {
            let peer = session
                .peer()
                .ok_or(ProtocolError::Unexpected("an event before hello"))?;
            *established = true;
            let (reply, answer) = oneshot::channel();
            let request = CoreRequest::Peer { peer, event, reply };
            ctx.core
                .send(request)
                .await
                .map_err(|_| DriveError::Stopping)?;
            pending.push_back(answer);
        }
        if !writer.busy() {
            for (collection, from, max) in session.wants() {
                let read = ctx.reader.log_from(&collection, from, max)?;
                session.send_entries(Instant::now(), &collection, read, max);
            }
        }
        writer.write_ready(session).await?;
        let more_to_read = !writer.busy() && !session.wants().is_empty();
        reporter.report(session, false);
        // A report held back by the interval is made when it is due, even if the
        // session goes quiet meanwhile.
        let timeout = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
            .min(reporter.due().unwrap_or(far_future()))
            .min(ctx.following.deadline().unwrap_or(far_future()));
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Err(DriveError::Stopping),
            (send, written) = writer.written(), if writer.busy() => {
                written?;
                writer = Writer::Idle(send);
            }
            reply = async { (pending.front_mut().expect("guarded")).await }, if !pending.is_empty() => {
                pending.pop_front();
                let actions = reply.map_err(|_| DriveError::Stopping)?.map_err(DriveError::Refused)?;
                let now = Instant::now();
                for action in actions {
                    session.act(now, action);
                }
            }
            frame = frames_rx.recv(), if pending.len() < EVENTS_IN_FLIGHT_MAX => {
                let frame = frame.ok_or(DriveError::Stopping)??;
                session.handle(Instant::now(), &frame)?;
            }
            _ = log_version.changed() => session.log_grew(),
            _ = following.changed() => ctx.following.tell(session),
            _ = tokio::time::sleep_until(timeout.into()) => {
                let now = Instant::now();
                ctx.following.update(|f| f.poll(now));
                session.handle_timeout(now)?;
            }
            _ = async {}, if more_to_read => {}
        }
    }
}

/// Reads frames from the stream into `frames` until it ends or fails.
async fn read_frames(
    mut recv: quinn::RecvStream,
    frames: mpsc::Sender<Result<Vec<u8>, FrameError>>,
) {
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
        if frames.send(result).await.is_err() || end {
            return;
        }
    }
}

/// Reports one connection's session to the telemetry: the peer's status, its
/// acknowledgements into the latency histogram, and the progress of a long catch-up.
struct Reporter<'a> {
    telemetry: &'a Telemetry,
    peer: PeerId,
    /// The connection, for its statistics and address.
    connection: &'a quinn::Connection,
    /// Whether the session was announced as up.
    announced: bool,
    last: Option<Instant>,
    /// Something happened since the last report.
    dirty: bool,
    /// The session's counters at the last look.
    counters: (u64, u64, u64),
    /// What was reported already, to report only what came since.
    sent: u64,
    received: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// The catch-up shown, and the entries behind when it started.
    catch_up: Option<(Progress, u64)>,
    catch_up_checked: bool,
}

impl<'a> Reporter<'a> {
    fn new(
        telemetry: &'a Telemetry,
        peer: PeerId,
        connection: &'a quinn::Connection,
    ) -> Reporter<'a> {
        Reporter {
            telemetry,
            peer,
            connection,
            announced: false,
            last: None,
            dirty: false,
            counters: (0, 0, 0),
            sent: 0,
            received: 0,
            bytes_in: 0,
            bytes_out: 0,
            catch_up: None,
            catch_up_checked: false,
        }
    }

    /// When a report held back by [`REPORT_INTERVAL_MS`] is due, if one is.
    fn due(&self) -> Option<Instant> {
        let last = self.last?;
        self.dirty
            .then(|| last + Duration::from_millis(REPORT_INTERVAL_MS))
    }

    /// Reports the session's progress: now if `now` or [`REPORT_INTERVAL_MS`] passed,
    /// else it is due later (see [`Reporter::due`]).
    fn report(&mut self, session: &mut Session, now: bool) {
        let connection = self.connection;
        let now_ms = crate::core::now_ms();
        for (collection, from, upto) in session.take_acked() {
            self.telemetry
                .acked(self.peer, &collection, from, upto, now_ms);
        }
        let counters = session.counters();
        if counters != self.counters {
            self.counters = counters;
            self.dirty = true;
        }
        let due = self
            .last
            .is_none_or(|last| last.elapsed() >= Duration::from_millis(REPORT_INTERVAL_MS));
        let first = !self.announced && session.peer().is_some();
        if !(now || first || (due && self.dirty)) || session.peer().is_none() {
            return;
        }
        self.last = Some(Instant::now());
        self.dirty = false;
        let progress = session.progress();
        let stats = connection.stats();
        let (bytes_in, bytes_out) = (stats.udp_rx.bytes, stats.udp_tx.bytes);
        let announce = !self.announced;
        self.announced = true;
        let addr = connection.remote_address().to_string();
        self.telemetry.peer(self.peer, |status| {
            if announce {
                status.sessions += 1;
                status.connected = true;
                status.since_ms = Some(now_ms);
                status.addr = Some(addr.clone());
            }
            status.last_seen_ms = Some(now_ms);
            status.sent += progress.sent - self.sent;
            status.received += progress.received - self.received;
            status.bytes_in += bytes_in.saturating_sub(self.bytes_in);
            status.bytes_out += bytes_out.saturating_sub(self.bytes_out);
            status.streams = progress
                .streams
                .iter()
                .map(|(collection, in_flight, next, acked)| StreamProgress {
                    collection: collection.clone(),
                    in_flight: *in_flight,
                    next: *next,
                    acked: *acked,
                })
                .collect();
            status.incoming_behind = progress.incoming_behind;
        });
        if announce {
            tracing::info!(remote = %addr, "peer connected");
            self.telemetry
                .note("peer", format!("connected to {} at {addr}", self.peer));
        }
        (self.sent, self.received) = (progress.sent, progress.received);
        (self.bytes_in, self.bytes_out) = (bytes_in, bytes_out);
        self.show_catch_up(progress.incoming_behind);
    }

    /// Shows the progress of receiving what the peer had at its hello, when that is a
    /// lot.
    fn show_catch_up(&mut self, incoming_behind: Option<u64>) {
        let Some(behind) = incoming_behind else {
            return;
        };
        if !self.catch_up_checked {
            self.catch_up_checked = true;
            let short: String = self.peer.to_string().chars().take(12).collect();
            self.catch_up =
                Progress::start(format!("sync with peer {short}"), behind).map(|p| (p, behind));
        }
        if let Some((progress, start)) = &mut self.catch_up {
            let done = start.saturating_sub(behind);
            progress.advance(done.saturating_sub(progress.done()));
            if behind == 0
                && let Some((progress, _)) = self.catch_up.take()
            {
                progress.finish();
            }
        }
    }

    /// The connection ended with `result`.
    fn ended(&mut self, result: &Result<(), DriveError>) {
        if !self.announced {
            return;
        }
        if let Some((progress, _)) = self.catch_up.take() {
            progress.finish();
        }
        self.telemetry.peer(self.peer, |status| {
            status.sessions = status.sessions.saturating_sub(1);
            status.connected = status.sessions > 0;
        });
        let why = match result {
            Ok(()) => "closed".to_owned(),
            Err(e) => e.to_string(),
        };
        self.telemetry
            .note("peer", format!("disconnected from {}: {why}", self.peer));
    }
}
