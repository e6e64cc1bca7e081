//! Measures what it costs a peer to catch up: `cargo run --release -p simulations
//! --bin catch-up -- --records 1000000 --changed 10`.
//!
//! Two real stores (fjall on disk) are filled with the same N records through the
//! real engine. Then `changed` records are edited on A while B is away, and B
//! reconnects, once with its persisted cursor and once with that cursor lost.
//! Sessions are the real replication state machine; bytes are the frames they
//! exchange (with the 4-byte length prefix); time is wall time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use concord_agent::engine::{CollectionInfo, Engine, WireEntry};
use concord_agent::replication::{Event, Session};
use concord_agent::store::{Store, peer_cursor};
use connectors::sqlite::{CapturedChange, RowState};
use crdt_model::{ChangeHash, DocId, Record, Value};

/// Catch-up cost after a peer was away.
#[derive(Debug, Parser)]
#[command(name = "catch-up")]
struct Cli {
    /// Records both stores hold.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Records changed on A while B was away.
    #[arg(long, default_value_t = 10)]
    changed: u64,
}

const COLLECTION: &str = "items";
const BATCH: u64 = 1_000;

fn engine(dir: &std::path::Path) -> anyhow::Result<Engine> {
    let collections = BTreeMap::from([(
        COLLECTION.to_owned(),
        CollectionInfo {
            columns: vec!["name".to_owned(), "qty".to_owned()],
        },
    )]);
    Ok(Engine::new(
        Store::open(dir)?,
        "tool".to_owned(),
        collections,
    )?)
}

fn row(i: u64, round: u64) -> CapturedChange {
    let record = Record::from([
        (
            "name".to_owned(),
            Value::Text(format!("record {i} round {round}")),
        ),
        ("qty".to_owned(), Value::Int(i as i64)),
    ]);
    CapturedChange {
        collection: COLLECTION.to_owned(),
        key: i.to_string(),
        state: RowState::Present(record),
    }
}

/// Runs two sessions (A serves, B catches up) until B holds everything A's log
/// holds; returns (wall time, bytes A→B, bytes B→A).
fn catch_up(
    a: &mut Engine,
    b: &mut Engine,
    lose_cursor: bool,
) -> anyhow::Result<(Duration, u64, u64)> {
    let a_id = a.store_id();
    if lose_cursor {
        let mut batch = b.store().batch();
        b.store()
            .stage_cursor(&mut batch, &peer_cursor(&a_id, COLLECTION), 0);
        b.store().commit(batch)?;
    }
    let head = a.reader().log_head(COLLECTION)?;
    let started = Instant::now();
    let now = Instant::now();
    let heads = |e: &Engine| -> anyhow::Result<Vec<(String, u64)>> {
        Ok(vec![(
            COLLECTION.to_owned(),
            e.reader().log_head(COLLECTION)?,
        )])
    };
    let mut sa = Session::new(a_id, heads(a)?, now);
    let mut sb = Session::new(b.store_id(), heads(b)?, now);
    let (mut to_b, mut to_a) = (0u64, 0u64);
    let (mut applied_upto, mut subscribed_from) = (0, u64::MAX);
    let mut anti_entropy_done = false;
    for _round in 0..10_000_000u64 {
        let mut moved = false;
        while let Some(frame) = sa.poll_transmit() {
            to_b += frame.len() as u64 + 4;
            sb.handle(now, &frame)?;
            moved = true;
        }
        while let Some(frame) = sb.poll_transmit() {
            to_a += frame.len() as u64 + 4;
            sa.handle(now, &frame)?;
            moved = true;
        }
        while let Some(event) = sa.poll_event() {
            match event {
                Event::PeerHello { .. } => sa.subscribe(vec![(COLLECTION.to_owned(), 1)]),
                Event::DigestQuery {
                    collection,
                    depth,
                    prefix,
                } => {
                    let digests = a
                        .store()
                        .digest_children(&collection, depth, prefix)?
                        .unwrap_or_default();
                    sa.digests(collection, depth, prefix, digests);
                }
                Event::BucketQuery { collection, bucket } => {
                    let docs = a.reader().bucket_docs(&collection, bucket)?;
                    sa.bucket(collection, bucket, docs);
                }
                Event::NeedDoc {
                    collection,
                    doc,
                    heads,
                } => {
                    let heads: Vec<ChangeHash> = heads.into_iter().map(ChangeHash).collect();
                    let changes = a
                        .changes_since(DocId(doc), &heads)?
                        .map(|f| f.changes)
                        .unwrap_or_default();
                    sa.doc_changes(collection, doc, changes);
                }
                other => anyhow::bail!("unexpected event at A: {other:?}"),
            }
        }
        while let Some(event) = sb.poll_event() {
            match event {
                Event::PeerHello { store } => {
                    let (cursor, walk) = sb.subscription(
                        COLLECTION,
                        b.reader().cursor(&peer_cursor(&store, COLLECTION))?,
                        false,
                        b.reader().log_head(COLLECTION)? > 0,
                    );
                    subscribed_from = cursor;
                    sb.subscribe(vec![(COLLECTION.to_owned(), cursor)]);
                    if walk {
                        sb.start_anti_entropy(COLLECTION.to_owned());
                    } else {
                        anti_entropy_done = true;
                    }
                }
                Event::Apply {
                    collection,
                    upto,
                    entries,
                } => {
                    let count = entries.len();
                    let mut batch = b.store().batch();
                    b.apply_remote(&mut batch, a_id, &collection, Some(upto), entries)?;
                    b.store().commit(batch)?;
                    sb.applied(now, collection, upto, count);
                    applied_upto = upto;
                }
                Event::Digests {
                    collection,
                    depth,
                    prefix,
                    digests,
                } => {
                    let ours = b
                        .store()
                        .digest_children(&collection, depth, prefix)?
                        .unwrap_or_default();
                    sb.compare_digests(&collection, depth, prefix, &digests, &ours);
                }
                Event::Bucket {
                    collection,
                    bucket: _,
                    docs,
                } => {
                    for (doc, theirs) in docs {
                        if b.reader().doc_digest(&collection, DocId(doc))? != theirs {
                            let heads = b.heads(DocId(doc))?;
                            sb.repair(collection.clone(), doc, heads.iter().map(|h| h.0).collect());
                        }
                    }
                    sb.answered(&collection);
                }
                Event::DocChanges {
                    collection,
                    doc,
                    changes,
                } => {
                    let mut batch = b.store().batch();
                    let entry = WireEntry {
                        seq: 0,
                        doc,
                        changes,
                    };
                    b.apply_remote(&mut batch, a_id, &collection, None, vec![entry])?;
                    b.store().commit(batch)?;
                    sb.repaired(doc);
                }
                Event::AntiEntropyDone { .. } => anti_entropy_done = true,
                other => anyhow::bail!("unexpected event at B: {other:?}"),
            }
        }
        for (collection, from, max) in sa.wants() {
            let read = a.reader().log_from(&collection, from, max)?;
            sa.send_entries(now, &collection, read, max);
            moved = true;
        }
        // Flush B's delayed acknowledgements; B's own log is not served here.
        sb.handle_timeout(now + Duration::from_secs(1))?;
        let log_done = applied_upto >= head || subscribed_from > head;
        if log_done && anti_entropy_done && !moved {
            break;
        }
    }
    Ok((started.elapsed(), to_b, to_a))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tmp = tempfile::tempdir()?;
    let (mut a, mut b) = (
        engine(&tmp.path().join("a"))?,
        engine(&tmp.path().join("b"))?,
    );
    let started = Instant::now();
    let mut cursor = 0;
    for first in (0..cli.records).step_by(BATCH as usize) {
        let rows: Vec<CapturedChange> = (first..(first + BATCH).min(cli.records))
            .map(|i| row(i, 0))
            .collect();
        cursor += rows.len() as u64;
        let mut batch = a.store().batch();
        a.capture(&mut batch, rows, cursor, 0)?;
        a.store().commit(batch)?;
    }
    let filled = started.elapsed();
    // B receives everything once, the normal way.
    let (initial, initial_bytes, _) = catch_up(&mut a, &mut b, false)?;
    println!(
        "setup: {} records captured on A in {:.1} s, copied to B in {:.1} s ({} bytes)",
        cli.records,
        filled.as_secs_f64(),
        initial.as_secs_f64(),
        initial_bytes
    );
    // B goes away; A changes some records.
    let rows: Vec<CapturedChange> = (0..cli.changed)
        .map(|k| row(k * (cli.records / cli.changed.max(1)), 1))
        .collect();
    cursor += rows.len() as u64;
    let mut batch = a.store().batch();
    a.capture(&mut batch, rows, cursor, 0)?;
    a.store().commit(batch)?;
    let (time, to_b, to_a) = catch_up(&mut a, &mut b, false)?;
    println!(
        "catch-up with the cursor:   {:.2} ms, {} bytes ({} to B, {} to A)  (goal <= 100 ms, <= 20 KB)",
        time.as_secs_f64() * 1000.0,
        to_b + to_a,
        to_b,
        to_a
    );
    // B goes away again, more records change, and B's cursor is lost.
    let rows: Vec<CapturedChange> = (0..cli.changed)
        .map(|k| row(k * (cli.records / cli.changed.max(1)) + 1, 2))
        .collect();
    cursor += rows.len() as u64;
    let mut batch = a.store().batch();
    a.capture(&mut batch, rows, cursor, 0)?;
    a.store().commit(batch)?;
    let (time, to_b, to_a) = catch_up(&mut a, &mut b, true)?;
    println!(
        "catch-up, cursor lost:      {:.2} ms, {} bytes ({} to B, {} to A)  (anti-entropy; goal <= 100 ms, <= 20 KB)",
        time.as_secs_f64() * 1000.0,
        to_b + to_a,
        to_b,
        to_a
    );
    Ok(())
}
