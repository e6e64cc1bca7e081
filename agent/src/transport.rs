//! QUIC between agents: mutual TLS 1.3 with pinned peer ids, and length-prefixed frames.
//!
//! Every agent has one [`Transport`], a single UDP endpoint that both accepts
//! connections and dials out. Both sides present their self-signed
//! [`Identity`] certificate, and both sides check the other's [`PeerId`]:
//!
//! - a server accepts a client only if the client's id is in [`PinnedPeers`];
//! - a client accepts a server only if its id is the one it dialled.
//!
//! Certificate chains, names and expiry dates play no part; possession of the
//! pinned key is the whole test, proved by the TLS 1.3 handshake signature.
//! Session resumption and 0-RTT are off, so every connection is checked against
//! the current pins.
//!
//! On a bidirectional stream, messages travel as frames: a big-endian `u32`
//! length, then that many payload bytes, at most [`FRAME_BYTES_MAX`]. See
//! [`write_frame`] and [`read_frame`].
//!
//! Architecture Invariant: this module knows QUIC and TLS, not the replication
//! protocol; it moves authenticated, bounded byte frames and nothing else.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, IdleTimeout, RecvStream, SendStream, VarInt};
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::ring::default_provider;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::NoServerSessionStorage;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, PeerIncompatible,
    SignatureScheme,
};
use tokio::sync::Mutex;
use tokio::task::{AbortHandle, JoinSet};

use crate::identity::{Identity, PeerId, peer_id_of};

/// The ALPN protocol id of Concord's peer protocol, version 1.
pub const ALPN: &[u8] = b"concord/1";

/// The largest frame payload [`read_frame`] accepts and [`write_frame`] sends.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// How often an idle connection sends a keep-alive packet.
pub const KEEP_ALIVE_INTERVAL_MS: u64 = 2_000;

/// How long a connection may go without hearing from the peer before it is closed.
///
/// This also bounds how long a handshake with an unresponsive address can take.
pub const IDLE_TIMEOUT_MS: u32 = 10_000;

/// How many incoming handshakes may run at once; a new one beyond it ends the oldest.
/// Only addresses that proved they receive what is sent to them (QUIC Retry) get
/// this far, and a handshake on a working link takes milliseconds, so junk cannot
/// hold the slots while a real peer waits.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 64;

/// How long an incoming handshake may take before it is abandoned.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// The application close code for a peer that is not pinned.
pub const CLOSE_CODE_NOT_PINNED: u32 = 3;

/// The server name sent in the TLS handshake; peers are identified by [`PeerId`], not names.
const SERVER_NAME: &str = "concord";

/// The application close code used by [`Transport::close`].
const CLOSE_CODE_SHUTDOWN: u32 = 0;

/// What can go wrong setting up the endpoint or establishing a connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TLS configuration could not be built from the identity.
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    /// The crypto provider lacks the cipher suite QUIC needs for initial packets.
    #[error("QUIC configuration: {0}")]
    NoInitialCipherSuite(#[source] NoInitialCipherSuite),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP socket {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The endpoint's local address could not be read.
    #[error("cannot read the endpoint's local address: {0}")]
    LocalAddr(#[source] io::Error),
    /// A connection to `addr` could not even be started (endpoint closed, bad address).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: quinn::ConnectError,
    },
    /// The handshake failed: the peer is not pinned, unreachable, or speaks another protocol.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The peer's address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: ConnectionError,
    },
    /// The handshake completed but the peer presented no usable certificate.
    #[error("peer at {addr} presented no certificate")]
    NoPeerCertificate {
        /// The peer's address.
        addr: SocketAddr,
    },
    /// The peer proved its key, but its id is not pinned: it is not let in.
    #[error("peer {peer} at {addr} is not in this agent's [[peer]] list")]
    NotPinned {
        /// The peer's id.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
    },
    /// The handshake did not finish within [`HANDSHAKE_TIMEOUT_MS`].
    #[error("handshake with {addr} did not finish within {HANDSHAKE_TIMEOUT_MS} ms")]
    HandshakeTimeout {
        /// The peer's address.
        addr: SocketAddr,
    },
}

/// The outcome of one incoming handshake.
type Accepted = Result<(quinn::Connection, PeerId), TransportError>;

/// What can go wrong reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame's length exceeds [`FRAME_BYTES_MAX`]; its body was not read or sent.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// The length announced or requested.
        len: usize,
        /// The limit, [`FRAME_BYTES_MAX`].
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended after {received} of {expected} bytes of a frame")]
    Truncated {
        /// The bytes the frame's length prefix or header promised.
        expected: usize,
        /// The bytes that arrived before the end.
        received: usize,
    },
    /// Reading from the stream failed (connection lost, stream reset).
    #[error("reading frame: {0}")]
    Read(#[source] quinn::ReadError),
    /// Writing to the stream failed (connection lost, stream stopped).
    #[error("writing frame: {0}")]
    Write(#[source] quinn::WriteError),
}

/// The set of peers this agent accepts connections from.
///
/// Share it as `Arc<PinnedPeers>` between the [`Transport`] and whatever manages
/// the configuration; changes apply to the next handshake. Removing a peer does
/// not close its open connections.
#[derive(Debug, Default)]
pub struct PinnedPeers {
    peers: RwLock<HashSet<PeerId>>,
}

impl PinnedPeers {
    /// Creates a pin set holding `peers`.
    pub fn new(peers: impl IntoIterator<Item = PeerId>) -> PinnedPeers {
        PinnedPeers {
            peers: RwLock::new(peers.into_iter().collect()),
        }
    }

    /// Whether `peer` may connect to this agent.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(peer)
    }

    /// Pins `peer`; returns false if it was already pinned.
    pub fn insert(&self, peer: PeerId) -> bool {
        self.peers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer)
    }

    /// Unpins `peer`; returns false if it was not pinned.
    pub fn remove(&self, peer: &PeerId) -> bool {
        self.peers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(peer)
    }

    /// The pinned peers, in no particular order.
    pub fn to_vec(&self) -> Vec<PeerId> {
        self.peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }
}

/// Why a presented certificate was refused; carried inside the rustls error so
/// that logs on the refusing side say which peer it was.
#[derive(Debug, thiserror::Error)]
enum PinError {
    /// A server's id is not the one dialled.
    #[error("expected peer {expected}, but the server is {actual}")]
    UnexpectedPeer {
        /// The id dialled.
        expected: PeerId,
        /// The id the server presented.
        actual: PeerId,
    },
}

fn pin_error(error: PinError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

fn presented_peer_id(end_entity: &CertificateDer<'_>) -> Result<PeerId, rustls::Error> {
    peer_id_of(end_entity)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        PeerIncompatible::Tls13RequiredForQuic,
    ))
}

/// Accepts a server only if its certificate's [`PeerId`] is the one dialled.
#[derive(Debug)]
struct ExpectedServerVerifier {
    expected: PeerId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = presented_peer_id(end_entity)?;
        if actual != self.expected {
            return Err(pin_error(PinError::UnexpectedPeer {
                expected: self.expected,
                actual,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Requires a client certificate and its signature; whether its [`PeerId`] is pinned
/// is checked once the handshake has proved the key (see `handshake`), so that a
/// refusal names the peer plainly.
#[derive(Debug)]
struct PinnedClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        presented_peer_id(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// This agent's QUIC endpoint: it accepts pinned peers and dials peers by id.
#[derive(Debug)]
pub struct Transport {
    endpoint: Endpoint,
    identity: Identity,
    provider: Arc<CryptoProvider>,
    transport_config: Arc<quinn::TransportConfig>,
    /// The peers let in.
    pinned: Arc<PinnedPeers>,
    /// Incoming handshakes under way, so that one slow peer cannot hold up the
    /// others, with their abort handles oldest first.
    handshakes: Mutex<(JoinSet<Accepted>, VecDeque<AbortHandle>)>,
    /// Set by [`Transport::close`].
    closed: AtomicBool,
}

impl Transport {
    /// Binds a UDP socket at `addr` and starts accepting peers in `pinned`.
    ///
    /// Must be called within a tokio runtime. Bind port 0 to let the system
    /// choose, then read it with [`local_addr`](Transport::local_addr).
    pub fn bind(
        identity: &Identity,
        addr: SocketAddr,
        pinned: Arc<PinnedPeers>,
    ) -> Result<Transport, TransportError> {
        let provider = Arc::new(default_provider());
        let transport_config = Arc::new(transport_config());

        let verifier = Arc::new(PinnedClientVerifier {
            algorithms: provider.signature_verification_algorithms,
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TransportError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![identity.cert().clone()],
                PrivateKeyDer::Pkcs8(identity.key().clone_key()),
            )
            .map_err(TransportError::Tls)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // Without resumption every connection re-runs the pin check.
        tls.session_storage = Arc::new(NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        let quic = QuicServerConfig::try_from(tls).map_err(TransportError::NoInitialCipherSuite)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server_config.transport_config(transport_config.clone());

        let endpoint = Endpoint::server(server_config, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        Ok(Transport {
            endpoint,
            identity: identity.clone(),
            provider,
            transport_config,
            pinned,
            handshakes: Mutex::new((JoinSet::new(), VecDeque::new())),
            closed: AtomicBool::new(false),
        })
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(TransportError::LocalAddr)
    }

    /// The id this endpoint presents to peers.
    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    /// Dials `addr` and completes the handshake only if the server is `expected`.
    ///
    /// A server with any other id is refused with [`TransportError::Handshake`].
    /// If the server does not pin this agent, the client's side of the handshake
    /// may still finish; the server then closes the connection at once, which
    /// shows up as [`ConnectionError`]s on the first stream operation and from
    /// `Connection::closed`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: PeerId,
    ) -> Result<quinn::Connection, TransportError> {
        let verifier = Arc::new(ExpectedServerVerifier {
            expected,
            algorithms: self.provider.signature_verification_algorithms,
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TransportError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(
                vec![self.identity.cert().clone()],
                PrivateKeyDer::Pkcs8(self.identity.key().clone_key()),
            )
            .map_err(TransportError::Tls)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.resumption = Resumption::disabled();
        tls.enable_sni = false;
        let quic = QuicClientConfig::try_from(tls).map_err(TransportError::NoInitialCipherSuite)?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
        client_config.transport_config(self.transport_config.clone());

        let connecting = self
            .endpoint
            .connect_with(client_config, addr, SERVER_NAME)
            .map_err(|source| TransportError::Connect { addr, source })?;
        connecting
            .await
            .map_err(|source| TransportError::Handshake { addr, source })
    }

    /// Waits for the next peer to finish its handshake.
    ///
    /// Yields `Some(Err(..))` for a handshake that failed, including a client
    /// that is not pinned; log it and call `accept` again. Returns `None` once
    /// the endpoint is closed.
    ///
    /// An address that has not proved it receives what is sent to it is answered
    /// with a QUIC Retry, which costs no state: spoofed or junk Initial packets never
    /// start a handshake. Handshakes run concurrently, at most
    /// [`HANDSHAKES_IN_FLIGHT_MAX`] at a time (a new one ends the oldest), each
    /// bounded by [`HANDSHAKE_TIMEOUT_MS`], and keep running between calls.
    /// Cancel-safe; callers share one queue, so one accept loop per transport is the
    /// expected use.
    pub async fn accept(&self) -> Option<Result<(quinn::Connection, PeerId), TransportError>> {
        let mut guard = self.handshakes.lock().await;
        let (handshakes, order) = &mut *guard;
        loop {
            if self.closed.load(Ordering::Acquire) {
                // Handshakes still in flight fail with the endpoint; nobody needs those errors.
                handshakes.abort_all();
                return None;
            }
            tokio::select! {
                biased;
                Some(joined) = handshakes.join_next() => match joined {
                    // A handshake cut short by `close` loops back to return None.
                    Ok(accepted) if !self.closed.load(Ordering::Acquire) => return Some(accepted),
                    Ok(_) => continue,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // Only aborted tasks end otherwise: the oldest handshakes, ended
                    // for newer ones, and all of them when the transport closes.
                    Err(_) => continue,
                },
                incoming = self.endpoint.accept() => {
                    let incoming = incoming?;
                    if !incoming.remote_address_validated() && incoming.may_retry() {
                        // Stateless: the address must echo the token to go on.
                        let _ = incoming.retry();
                        continue;
                    }
                    order.retain(|handle| !handle.is_finished());
                    while order.len() >= HANDSHAKES_IN_FLIGHT_MAX {
                        if let Some(oldest) = order.pop_front() {
                            oldest.abort();
                        }
                    }
                    order.push_back(handshakes.spawn(handshake(incoming, self.pinned.clone())));
                }
            }
        }
    }

    /// Closes every connection and stops accepting; pending and later
    /// [`accept`](Transport::accept) calls return `None`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.endpoint
            .close(VarInt::from_u32(CLOSE_CODE_SHUTDOWN), b"shutdown");
    }

    /// Waits until every connection has finished closing; call after
    /// [`close`](Transport::close) so that peers learn of it.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// Completes the server side of one handshake, names the client and lets it in only
/// if it is pinned; an unpinned client's connection is closed before any stream.
async fn handshake(incoming: quinn::Incoming, pinned: Arc<PinnedPeers>) -> Accepted {
    let addr = incoming.remote_address();
    let timeout = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let connection = tokio::time::timeout(timeout, incoming)
        .await
        .map_err(|_| TransportError::HandshakeTimeout { addr })?
        .map_err(|source| TransportError::Handshake { addr, source })?;
    let Some(peer) = remote_peer_id(&connection) else {
        connection.close(VarInt::from_u32(CLOSE_CODE_SHUTDOWN), b"no certificate");
        return Err(TransportError::NoPeerCertificate { addr });
    };
    if !pinned.contains(&peer) {
        connection.close(
            VarInt::from_u32(CLOSE_CODE_NOT_PINNED),
            b"not in this agent's peer list",
        );
        return Err(TransportError::NotPinned { peer, addr });
    }
    Ok((connection, peer))
}

fn transport_config() -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config.keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_INTERVAL_MS)));
    config.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))));
    config
}

/// The [`PeerId`] of the other end of an established connection.
///
/// Returns `None` only for a connection that did not come from a [`Transport`]
/// (no certificate was exchanged).
pub fn remote_peer_id(conn: &quinn::Connection) -> Option<PeerId> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    peer_id_of(certs.first()?).ok()
}

/// Sends `payload` as one frame: its length as a big-endian `u32`, then the bytes.
///
/// A payload over [`FRAME_BYTES_MAX`] is refused with [`FrameError::Oversized`]
/// before anything is written.
pub async fn write_frame(send: &mut SendStream, payload: &[u8]) -> Result<(), FrameError> {
    let len = payload.len();
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::Oversized {
            len,
            max: FRAME_BYTES_MAX,
        });
    }
    // FRAME_BYTES_MAX fits in a u32, so the length does too.
    let prefix = (len as u32).to_be_bytes();
    send.write_all(&prefix).await.map_err(FrameError::Write)?;
    send.write_all(payload).await.map_err(FrameError::Write)
}

/// Reads one frame's payload into `buf`, replacing its contents.
///
/// Returns `Ok(false)` if the stream ended cleanly before a frame began. A
/// length over [`FRAME_BYTES_MAX`] fails with [`FrameError::Oversized`] without
/// reading the body; an end of stream inside a frame fails with
/// [`FrameError::Truncated`].
pub async fn read_frame(recv: &mut RecvStream, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
    const PREFIX_BYTES: usize = 4;

    let mut prefix = [0u8; PREFIX_BYTES];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(false),
        Err(quinn::ReadExactError::FinishedEarly(received)) => {
            return Err(FrameError::Truncated {
                expected: PREFIX_BYTES,
                received,
            });
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(FrameError::Read(e)),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::Oversized {
            len,
            max: FRAME_BYTES_MAX,
        });
    }

    buf.clear();
    buf.resize(len, 0);
    match recv.read_exact(buf).await {
        Ok(()) => Ok(true),
        Err(quinn::ReadExactError::FinishedEarly(received)) => Err(FrameError::Truncated {
            expected: len,
            received,
        }),
        Err(quinn::ReadExactError::ReadError(e)) => Err(FrameError::Read(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use tokio::time::timeout;

    use super::*;

    /// Far longer than a loopback handshake takes, far shorter than the idle timeout.
    const TEST_DEADLINE: Duration = Duration::from_secs(5);

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn localhost() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
    }

    struct Agent {
        identity: Identity,
        pinned: Arc<PinnedPeers>,
        transport: Transport,
    }

    fn agent() -> Result<Agent, Box<dyn std::error::Error>> {
        let identity = Identity::generate()?;
        let pinned = Arc::new(PinnedPeers::default());
        let transport = Transport::bind(&identity, localhost(), pinned.clone())?;
        Ok(Agent {
            identity,
            pinned,
            transport,
        })
    }

    #[tokio::test]
    async fn pinned_peers_exchange_frames_both_ways() -> TestResult {
        let server = agent()?;
        let client = agent()?;
        server.pinned.insert(client.identity.peer_id());
        let server_addr = server.transport.local_addr()?;

        let server_task = async {
            let (conn, peer) = server.transport.accept().await.ok_or("endpoint closed")??;
            assert_eq!(peer, client.identity.peer_id());
            assert_eq!(remote_peer_id(&conn), Some(peer));
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut buf = Vec::new();
            assert!(read_frame(&mut recv, &mut buf).await?);
            assert_eq!(buf, b"hello from client");
            assert!(read_frame(&mut recv, &mut buf).await?);
            assert!(buf.is_empty());
            assert!(!read_frame(&mut recv, &mut buf).await?);
            write_frame(&mut send, b"hello from server").await?;
            send.finish()?;
            conn.closed().await;
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        let client_task = async {
            let conn = client
                .transport
                .connect(server_addr, server.identity.peer_id())
                .await?;
            assert_eq!(remote_peer_id(&conn), Some(server.identity.peer_id()));
            let (mut send, mut recv) = conn.open_bi().await?;
            write_frame(&mut send, b"hello from client").await?;
            write_frame(&mut send, b"").await?;
            send.finish()?;
            let mut buf = Vec::new();
            assert!(read_frame(&mut recv, &mut buf).await?);
            assert_eq!(buf, b"hello from server");
            assert!(!read_frame(&mut recv, &mut buf).await?);
            conn.close(VarInt::from_u32(0), b"done");
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        let (served, dialled) = timeout(TEST_DEADLINE, async {
            tokio::join!(server_task, client_task)
        })
        .await?;
        served?;
        dialled?;
        Ok(())
    }

    #[tokio::test]
    async fn server_refuses_unpinned_client() -> TestResult {
        let server = agent()?;
        let client = agent()?;
        let server_addr = server.transport.local_addr()?;

        let server_task = async {
            match server.transport.accept().await {
                Some(Err(e @ TransportError::NotPinned { .. })) => {
                    let text = e.to_string();
                    assert!(
                        text.contains(&client.identity.peer_id().to_string())
                            && text.contains("is not in this agent's [[peer]] list"),
                        "refusal should name the client in a sentence: {text}"
                    );
                    Ok(())
                }
                Some(Ok((_, peer))) => Err(format!("server accepted unpinned {peer}")),
                other => Err(format!("unexpected accept result {other:?}")),
            }
        };
        let client_task = async {
            // The client's key is proved by the handshake, then the server closes the
            // connection before any stream: the client is not pinned.
            match client
                .transport
                .connect(server_addr, server.identity.peer_id())
                .await
            {
                Err(TransportError::Handshake { .. }) => Ok(()),
                Err(e) => Err(format!("unexpected error {e}")),
                Ok(conn) => match conn.closed().await {
                    ConnectionError::ApplicationClosed(close)
                        if close.error_code == VarInt::from_u32(CLOSE_CODE_NOT_PINNED) =>
                    {
                        Ok(())
                    }
                    e => Err(format!("unexpected close {e}")),
                },
            }
        };
        let (served, dialled) = timeout(TEST_DEADLINE, async {
            tokio::join!(server_task, client_task)
        })
        .await?;
        served?;
        dialled?;

        // Pinning takes effect for the next handshake, without rebinding.
        server.pinned.insert(client.identity.peer_id());
        let (accepted, dialled) = timeout(TEST_DEADLINE, async {
            tokio::join!(
                server.transport.accept(),
                client
                    .transport
                    .connect(server_addr, server.identity.peer_id())
            )
        })
        .await?;
        let (_, peer) = accepted.ok_or("endpoint closed")??;
        assert_eq!(peer, client.identity.peer_id());
        dialled?;
        Ok(())
    }

    #[tokio::test]
    async fn client_refuses_server_with_other_id() -> TestResult {
        let server = agent()?;
        let client = agent()?;
        let impostor = Identity::generate()?.peer_id();
        server.pinned.insert(client.identity.peer_id());
        let server_addr = server.transport.local_addr()?;

        let server_task = async {
            match server.transport.accept().await {
                Some(Err(TransportError::Handshake { .. })) => Ok(()),
                Some(Ok((_, peer))) => Err(format!("server handed out connection to {peer}")),
                other => Err(format!("unexpected accept result {other:?}")),
            }
        };
        let client_task = async {
            match client.transport.connect(server_addr, impostor).await {
                Err(TransportError::Handshake { source, .. }) => {
                    let text = source.to_string();
                    assert!(
                        text.contains(&server.identity.peer_id().to_string()),
                        "refusal should name the server: {text}"
                    );
                    Ok(())
                }
                Err(e) => Err(format!("unexpected error {e}")),
                Ok(_) => Err("client accepted a server it did not dial".to_owned()),
            }
        };
        let (served, dialled) = timeout(TEST_DEADLINE, async {
            tokio::join!(server_task, client_task)
        })
        .await?;
        served?;
        dialled?;
        Ok(())
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_refused() -> TestResult {
        let server = agent()?;
        let client = agent()?;
        server.pinned.insert(client.identity.peer_id());
        let server_addr = server.transport.local_addr()?;

        let server_task = async {
            let (conn, _) = server.transport.accept().await.ok_or("endpoint closed")??;
            let mut buf = Vec::new();

            let (_, mut recv) = conn.accept_bi().await?;
            match read_frame(&mut recv, &mut buf).await {
                Err(FrameError::Oversized { len, max }) => {
                    assert_eq!(len, FRAME_BYTES_MAX + 1);
                    assert_eq!(max, FRAME_BYTES_MAX);
                }
                other => return Err(format!("expected Oversized, got {other:?}").into()),
            }

            let (_, mut recv) = conn.accept_bi().await?;
            match read_frame(&mut recv, &mut buf).await {
                Err(FrameError::Truncated { expected, received }) => {
                    assert_eq!((expected, received), (10, 3));
                }
                other => return Err(format!("expected Truncated, got {other:?}").into()),
            }
            conn.close(VarInt::from_u32(0), b"done");
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        let client_task = async {
            let conn = client
                .transport
                .connect(server_addr, server.identity.peer_id())
                .await?;

            let (mut send, _recv) = conn.open_bi().await?;
            let too_long = u32::try_from(FRAME_BYTES_MAX + 1)?;
            send.write_all(&too_long.to_be_bytes()).await?;
            send.finish()?;

            let (mut send, _recv) = conn.open_bi().await?;
            send.write_all(&10u32.to_be_bytes()).await?;
            send.write_all(b"abc").await?;
            send.finish()?;

            let big = vec![0u8; FRAME_BYTES_MAX + 1];
            let (mut send, _recv) = conn.open_bi().await?;
            assert!(matches!(
                write_frame(&mut send, &big).await,
                Err(FrameError::Oversized { .. })
            ));
            conn.closed().await;
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        let (served, dialled) = timeout(TEST_DEADLINE, async {
            tokio::join!(server_task, client_task)
        })
        .await?;
        served?;
        dialled?;
        Ok(())
    }

    #[tokio::test]
    async fn accept_returns_none_after_close() -> TestResult {
        let server = agent()?;
        let (pending, ()) = timeout(TEST_DEADLINE, async {
            tokio::join!(server.transport.accept(), async {
                tokio::task::yield_now().await;
                server.transport.close();
            })
        })
        .await?;
        assert!(pending.is_none(), "pending accept: {pending:?}");
        let later = timeout(TEST_DEADLINE, server.transport.accept()).await?;
        assert!(later.is_none(), "later accept: {later:?}");
        Ok(())
    }

    #[test]
    fn pinned_peers_insert_and_remove() -> Result<(), crate::identity::IdentityError> {
        let a = Identity::generate()?.peer_id();
        let b = Identity::generate()?.peer_id();
        let pinned = PinnedPeers::new([a]);
        assert!(pinned.contains(&a));
        assert!(!pinned.contains(&b));
        assert!(pinned.insert(b));
        assert!(!pinned.insert(b));
        assert!(pinned.remove(&a));
        assert_eq!(pinned.to_vec(), vec![b]);
        Ok(())
    }
}
