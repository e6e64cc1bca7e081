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

use anyhow::Context;
use clap::Parser;
use concord_agent::engine::{CollectionInfo, Engine, RecordIdentity, ToolSpec};
use concord_agent::mapping::Mapping;
use concord_agent::replication::{Action, Event, Session, policy};
use concord_agent::store::{Store, peer_cursor};
use connectors::{CaptureBatch, CapturedChange, Cursor, RowState};
use crdt_model::{Record, Value};

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
            mapping: Mapping::plain(&["name".to_owned(), "qty".to_owned()]),
            natural_key: None,
            identity: RecordIdentity::SharedKey,
        },
    )]);
    let tool = ToolSpec {
        name: "tool".to_owned(),
        uid: "agent.tool".to_owned(),
        collections,
    };
    Ok(Engine::new(Store::open(dir)?, vec![tool], [])?)
}

/// Captured rows as the tool's batch ending at outbox seq `seq`.
fn batch_of(changes: Vec<CapturedChange>, seq: u64) -> CaptureBatch {
    CaptureBatch {
        changes,
        cursor: Cursor(seq.to_be_bytes().to_vec()),
        rescan: false,
    }
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
        previous_key: None,
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
    let mut progress = Progress {
        applied_upto: 0,
        subscribed_from: u64::MAX,
        anti_entropy_done: false,
    };
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
        pump_events(a, &mut sa, now, None)?;
        pump_events(b, &mut sb, now, Some(&mut progress))?;
        for (collection, from, max) in sa.wants() {
            let read = a.reader().log_from(&collection, from, max)?;
            sa.send_entries(now, &collection, read, max);
            moved = true;
        }
        // Flush B's delayed acknowledgements; B's own log is not served here.
        sb.handle_timeout(now + Duration::from_secs(1))?;
        let log_done = progress.applied_upto >= head || progress.subscribed_from > head;
        if log_done && progress.anti_entropy_done && !moved {
            break;
        }
    }
    Ok((started.elapsed(), to_b, to_a))
}

/// How far B got: the last seq applied, where it subscribed, whether its walk ended.
struct Progress {
    applied_upto: u64,
    subscribed_from: u64,
    anti_entropy_done: bool,
}

/// Acts on a session's events with the real peer policy, one commit per event.
fn pump_events(
    engine: &mut Engine,
    session: &mut Session,
    now: Instant,
    mut progress: Option<&mut Progress>,
) -> anyhow::Result<()> {
    while let Some(event) = session.poll_event() {
        let peer = session.peer().context("an event before hello")?;
        if let (Some(p), Event::AntiEntropyDone { .. }) = (progress.as_deref_mut(), &event) {
            p.anti_entropy_done = true;
        }
        let mut batch = engine.store().batch();
        let actions = policy::on_event(engine, &mut batch, peer, event)?;
        engine.store().commit(batch)?;
        for action in actions {
            if let Some(p) = progress.as_deref_mut() {
                match &action {
                    Action::Subscribe {
                        cursors,
                        anti_entropy,
                    } => {
                        p.subscribed_from = cursors.first().map_or(u64::MAX, |(_, c)| *c);
                        p.anti_entropy_done = anti_entropy.is_empty();
                    }
                    Action::Applied { upto, .. } => p.applied_upto = p.applied_upto.max(*upto),
                    _ => {}
                }
            }
            session.act(now, action);
        }
    }
    Ok(())
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
        a.capture(&mut batch, 0, batch_of(rows, cursor), cursor, 0)?;
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
    a.capture(&mut batch, 0, batch_of(rows, cursor), cursor, 0)?;
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
    a.capture(&mut batch, 0, batch_of(rows, cursor), cursor, 0)?;
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
