//! The closed door: unknown peers are refused; a misbehaving peer is cut off alone.

use std::sync::Arc;
use std::time::Duration;

use concord_agent::engine::WireEntry;
use concord_agent::identity::Identity;
use concord_agent::replication::{Message, decode, encode};
use concord_agent::transport::{PinnedPeers, Transport, read_frame, write_frame};
use concord_tests::{Node, Process, converged};

const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_an_unpinned_key_is_refused() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut intruder = Node::new(tmp.path(), "intruder")?;
    a.configure("127.0.0.1:0", &[])?;
    let agent_a = a.start().await?;
    a.db()?
        .execute("INSERT INTO customers (id, name) VALUES (1, 'secret')", [])?;

    // A full agent that pins A and dials it: A must not let it in.
    intruder.configure(
        "127.0.0.1:0",
        &[(a.id(), Some(agent_a.local_addr().to_string()))],
    )?;
    let agent_x = intruder.start().await?;
    // The same key dialing by hand: the connection is closed, never used.
    let identity = Identity::load(&intruder.files.dir.join("concord.key"))?;
    let transport = Transport::bind(
        &identity,
        "127.0.0.1:0".parse()?,
        Arc::new(PinnedPeers::new([a.id()])),
    )?;
    let refused = match transport.connect(agent_a.local_addr(), a.id()).await {
        Err(_) => true,
        Ok(connection) => {
            let opened = async {
                let (mut send, _recv) = connection.open_bi().await?;
                write_frame(&mut send, b"hello?").await?;
                anyhow::Ok(connection.closed().await)
            };
            tokio::time::timeout(CLOSE_TIMEOUT, opened).await.is_ok()
        }
    };
    assert!(refused, "A kept a connection from an unpinned key");
    assert!(agent_a.connected_peers().is_empty());
    assert!(intruder.rows()?.is_empty(), "the intruder received records");
    assert_eq!(agent_x.reader().doc_count()?, 0);
    agent_x.shutdown().await;
    agent_a.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dialed_peer_with_another_key_is_refused() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let impostor = Identity::generate()?;
    a.configure("127.0.0.1:0", &[(impostor.peer_id(), None)])?;
    let agent_a = a.start().await?;
    // Someone holding a pinned key dials A but expects A to be another peer.
    let transport = Transport::bind(
        &impostor,
        "127.0.0.1:0".parse()?,
        Arc::new(PinnedPeers::new([])),
    )?;
    let other = Identity::generate()?.peer_id();
    let result = tokio::time::timeout(
        CLOSE_TIMEOUT,
        transport.connect(agent_a.local_addr(), other),
    )
    .await?;
    assert!(
        result.is_err(),
        "connected to a server whose key is not the one expected"
    );
    agent_a.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_sending_a_garbage_frame_is_cut_off_while_the_other_keeps_syncing()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    let rogue = Identity::generate()?;
    a.configure("127.0.0.1:0", &[(b.id(), None), (rogue.peer_id(), None)])?;
    let agent_a = a.start().await?;
    b.configure(
        "127.0.0.1:0",
        &[(a.id(), Some(agent_a.local_addr().to_string()))],
    )?;
    let agent_b = b.start().await?;
    a.db()?
        .execute("INSERT INTO customers (id, name) VALUES (1, 'before')", [])?;
    converged(&[&a, &b]).await?;

    // A pinned but misbehaving peer: garbage instead of a hello.
    let transport = Transport::bind(
        &rogue,
        "127.0.0.1:0".parse()?,
        Arc::new(PinnedPeers::new([a.id()])),
    )?;
    let connection = transport.connect(agent_a.local_addr(), a.id()).await?;
    let (mut send, _recv) = connection.open_bi().await?;
    write_frame(&mut send, &[0xff; 64]).await?;
    let reason = tokio::time::timeout(CLOSE_TIMEOUT, connection.closed()).await?;
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref close) if close.error_code == 1u32.into()),
        "the rogue was not cut off for its garbage: {reason:?}"
    );

    // A truncated frame: a length prefix promising more than is sent, then the end.
    let connection = transport.connect(agent_a.local_addr(), a.id()).await?;
    let (mut send, _recv) = connection.open_bi().await?;
    send.write_all(&1000u32.to_be_bytes()).await?;
    send.write_all(b"short").await?;
    send.finish()?;
    tokio::time::timeout(CLOSE_TIMEOUT, connection.closed()).await?;

    // Meanwhile B is served as before.
    b.db()?
        .execute("INSERT INTO customers (id, name) VALUES (2, 'after')", [])?;
    a.db()?
        .execute("UPDATE customers SET city = 'still here' WHERE id = 1", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].3.as_deref(), Some("still here"));
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// A pinned peer speaking the protocol by hand.
struct Rogue {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    sent: u64,
    _transport: Transport,
}

impl Rogue {
    /// Connects to `addr` as `identity`, says hello and waits for the agent's
    /// subscription.
    async fn connect(
        identity: &Identity,
        addr: std::net::SocketAddr,
        agent: concord_agent::identity::PeerId,
    ) -> anyhow::Result<Rogue> {
        let transport = Transport::bind(
            identity,
            "127.0.0.1:0".parse()?,
            Arc::new(PinnedPeers::new([agent])),
        )?;
        let connection = transport.connect(addr, agent).await?;
        let (send, recv) = connection.open_bi().await?;
        let mut rogue = Rogue {
            connection,
            send,
            recv,
            sent: 0,
            _transport: transport,
        };
        rogue
            .send(&Message::Hello {
                version: concord_agent::replication::PROTOCOL_VERSION,
                store: [0x77; 16],
                heads: vec![("customers".to_owned(), 1)],
            })
            .await?;
        for _ in 0..16 {
            let mut buf = Vec::new();
            if !tokio::time::timeout(CLOSE_TIMEOUT, read_frame(&mut rogue.recv, &mut buf)).await?? {
                anyhow::bail!("the agent ended the stream");
            }
            if let (_, Message::Subscribe { .. }) = decode(&buf)? {
                return Ok(rogue);
            }
        }
        anyhow::bail!("no subscription from the agent")
    }

    async fn send(&mut self, message: &Message) -> anyhow::Result<()> {
        write_frame(&mut self.send, &encode(self.sent, message)).await?;
        self.sent += 1;
        Ok(())
    }

    /// Waits for the agent to close the connection; returns its reason.
    async fn closed(self) -> anyhow::Result<String> {
        let reason = tokio::time::timeout(CLOSE_TIMEOUT, self.connection.closed()).await?;
        match reason {
            quinn::ConnectionError::ApplicationClosed(close) if close.error_code == 1u32.into() => {
                Ok(String::from_utf8_lossy(&close.reason).into_owned())
            }
            other => anyhow::bail!("closed for another reason: {other:?}"),
        }
    }
}

/// A change of customer 9 whose `age` is a counter: no value Concord can read.
fn unreadable_change() -> anyhow::Result<Vec<u8>> {
    use automerge::transaction::Transactable;
    let mut doc =
        automerge::AutoCommit::new().with_actor(automerge::ActorId::from(&[0x77; 16][..]));
    doc.put(automerge::ROOT, "collection", "customers")?;
    doc.put(automerge::ROOT, "key", "9")?;
    doc.put(automerge::ROOT, "deleted", false)?;
    doc.put(automerge::ROOT, "f:name", "Mallory")?;
    doc.put(automerge::ROOT, "f:age", automerge::ScalarValue::counter(1))?;
    doc.commit();
    let change = doc
        .get_last_local_change()
        .ok_or_else(|| anyhow::anyhow!("a change"))?;
    Ok(change.raw_bytes().to_vec())
}

/// Regression (one value from a peer could crash-loop the agent): a change putting
/// a counter was stored and made every start abort. Now the peer's session closes,
/// the document is quarantined with the reason, and the agent serves everyone else,
/// then and after a restart. An unsolicited repair answer (`DocChanges` nobody asked
/// for) closes the session too.
#[tokio::test(flavor = "multi_thread")]
async fn bad_data_from_a_peer_closes_its_session_and_nothing_else() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    let rogue = Identity::generate()?;
    a.configure("127.0.0.1:0", &[(b.id(), None), (rogue.peer_id(), None)])?;
    let agent_a = a.start().await?;
    b.configure(
        "127.0.0.1:0",
        &[(a.id(), Some(agent_a.local_addr().to_string()))],
    )?;
    let agent_b = b.start().await?;

    let mut peer = Rogue::connect(&rogue, agent_a.local_addr(), a.id()).await?;
    let doc = crdt_model::DocId::of("customers", "9").0;
    peer.send(&Message::Entries {
        collection: "customers".to_owned(),
        upto: 1,
        entries: vec![WireEntry {
            seq: 1,
            doc,
            changes: vec![unreadable_change()?],
        }],
    })
    .await?;
    let reason = peer.closed().await?;
    assert!(
        reason.contains("age"),
        "the reason should name the field: {reason}"
    );
    let quarantined = agent_a.reader().quarantined()?;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].doc, doc);

    let mut peer = Rogue::connect(&rogue, agent_a.local_addr(), a.id()).await?;
    peer.send(&Message::DocChanges {
        collection: "customers".to_owned(),
        doc,
        changes: vec![unreadable_change()?],
    })
    .await?;
    let reason = peer.closed().await?;
    assert!(reason.contains("not asked for"), "{reason}");

    // A keeps serving B, and starts again (on the same port) with the bad peer's
    // data refused.
    b.db()?
        .execute("INSERT INTO customers (id, name) VALUES (1, 'after')", [])?;
    converged(&[&a, &b]).await?;
    let listen = agent_a.local_addr().to_string();
    agent_a.shutdown().await;
    a.configure(&listen, &[(b.id(), None), (rogue.peer_id(), None)])?;
    let agent_a = a.start().await?;
    a.db()?
        .execute("UPDATE customers SET city = 'still here' WHERE id = 1", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 1, "customer 9 must not appear: {rows:?}");
    assert_eq!(rows[0].3.as_deref(), Some("still here"));
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// Regression (a refused peer redialed 800 to 1,100 times a second): a dialer that
/// is refused backs off as after any failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_peer_backs_off() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut x = Node::new(tmp.path(), "x")?;
    a.configure("127.0.0.1:0", &[])?;
    let agent_a = a.start().await?;
    x.configure(
        "127.0.0.1:0",
        &[(a.id(), Some(agent_a.local_addr().to_string()))],
    )?;
    let agent_x = x.start().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dials = agent_x.dials();
    // 100, 200, 400, 800 and 1,600 ms between attempts: about six in three seconds.
    assert!((2..=10).contains(&dials), "{dials} dial attempts in 3 s");
    agent_x.shutdown().await;
    agent_a.shutdown().await;
    Ok(())
}

/// Regression (logs): a refused peer's attempts made a WARN line each (5,756 lines
/// in 5 s), written with colour codes into a file, as a debug dump. Now a refusal is
/// one sentence, repeated at most once a minute, without colour codes when the
/// output is not a terminal, and the storage engine's INFO lines stay out.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_peer_makes_one_plain_log_line() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut x = Node::new(tmp.path(), "x")?;
    a.configure("127.0.0.1:0", &[])?;
    let log_path = tmp.path().join("a.log");
    let proc_a = Process::start_logging(&a, None, std::fs::File::create(&log_path)?)?;
    x.configure("127.0.0.1:0", &[(a.id(), Some(proc_a.addr.clone()))])?;
    // Without backoff on the dialer, this is thousands of attempts.
    let agent_x = x.start().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    agent_x.shutdown().await;
    proc_a.stop()?;
    let log = std::fs::read_to_string(&log_path)?;
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
    assert_eq!(refusals.len(), 1, "{log}");
    assert!(
        refusals[0].contains(&format!("peer {} at", x.id()))
            && refusals[0].contains("is not in this agent's [[peer]] list"),
        "{}",
        refusals[0]
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file: {log:?}"
    );
    assert!(!log.contains("fjall") && !log.contains("lsm_tree"), "{log}");
    Ok(())
}

/// Regression (handshake lockout): about 20 QUIC Initial packets a second that
/// never finish a handshake kept all 64 handshake slots full, locking a pinned peer
/// out for 10 to 17 s. With 1,000 junk Initials a second arriving, a pinned peer
/// still connects within a second.
#[tokio::test(flavor = "multi_thread")]
async fn junk_initials_do_not_lock_a_pinned_peer_out() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let friend = Identity::generate()?;
    a.configure("127.0.0.1:0", &[(friend.peer_id(), None)])?;
    let agent_a = a.start().await?;
    let target = agent_a.local_addr();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let junk = {
        let stop = stop.clone();
        std::thread::spawn(move || junk_initials(target, &stop))
    };
    // Let the junk fill whatever it can first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let transport = Transport::bind(
        &friend,
        "127.0.0.1:0".parse()?,
        Arc::new(PinnedPeers::new([a.id()])),
    )?;
    let started = std::time::Instant::now();
    let mut connected = Err(anyhow::anyhow!("no attempt"));
    // A real peer retries a failed dial; within the second it must be in.
    while started.elapsed() < Duration::from_secs(1) {
        match tokio::time::timeout(Duration::from_secs(1), transport.connect(target, a.id())).await
        {
            Ok(Ok(connection)) => {
                connected = Ok(connection);
                break;
            }
            Ok(Err(e)) => connected = Err(e.into()),
            Err(e) => connected = Err(e.into()),
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = junk
        .join()
        .map_err(|_| anyhow::anyhow!("the junk sender panicked"))??;
    let connection = connected?;
    assert!(
        elapsed < Duration::from_secs(1),
        "connected after {elapsed:?}"
    );
    assert!(sent >= 400, "only {sent} junk Initials were sent");
    connection.close(0u32.into(), b"done");
    agent_a.shutdown().await;
    Ok(())
}

/// Sends QUIC Initial packets carrying a ClientHello from new connection ids at
/// 1,000 a second, never answering: each would hold a handshake slot until it times
/// out. Returns how many were sent.
fn junk_initials(
    target: std::net::SocketAddr,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        true,
        None,
    );
    let crypto = junk_client_crypto()?;
    let config = quinn_proto::ClientConfig::new(crypto);
    let mut sent = 0u64;
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    // At most 30 s of junk, whatever happens to the test.
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 30_000 {
        let now = std::time::Instant::now();
        let (_, mut connection) = endpoint.connect(now, config.clone(), target, "concord")?;
        buf.clear();
        if let Some(transmit) = connection.poll_transmit(now, 1, &mut buf) {
            socket.send_to(&buf[..transmit.size], target)?;
            sent += 1;
        }
        // 1,000 a second.
        let due = start + Duration::from_millis(sent);
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(sent)
}

fn junk_client_crypto() -> anyhow::Result<Arc<dyn quinn_proto::crypto::ClientConfig>> {
    let identity = Identity::generate()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(
            vec![identity.cert().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(identity.key().clone_key()),
        )?;
    tls.alpn_protocols = vec![concord_agent::transport::ALPN.to_vec()];
    Ok(Arc::new(
        quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ))
}

/// The junk sender never gets far enough to check a certificate.
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General("junk".into()))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("junk".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("junk".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
