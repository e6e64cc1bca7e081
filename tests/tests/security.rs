//! The closed door: unknown peers are refused; a misbehaving peer is cut off alone.

use std::sync::Arc;
use std::time::Duration;

use concord_agent::identity::Identity;
use concord_agent::transport::{PinnedPeers, Transport, write_frame};
use concord_tests::{Node, converged};

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
