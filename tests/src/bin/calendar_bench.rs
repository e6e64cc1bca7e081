//! Calendar benchmark: the first sync of a calendar between two real Radicale
//! servers through two agents, and the latency of one edit between them.
//!
//! `cargo run --release -p concord-tests --bin calendar-bench -- --events 2000
//! --recurring 200 --edits 20`

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use concord_tests::radicale::Radicale;
use concord_tests::{Node, free_udp_addr};

#[derive(Parser)]
struct Args {
    /// Events in the calendar.
    #[arg(long, default_value_t = 2000)]
    events: usize,
    /// How many of them are weekly series, each with a moved and a cancelled
    /// occurrence.
    #[arg(long, default_value_t = 200)]
    recurring: usize,
    /// Edits timed one after the other.
    #[arg(long, default_value_t = 20)]
    edits: usize,
}

/// How long the first sync may take before the benchmark gives up.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one edit may take.
const EDIT_TIMEOUT: Duration = Duration::from_secs(30);

fn event(i: usize, recurring: bool, summary: &str) -> String {
    let uid = format!("event-{i:05}");
    let day = 1 + i % 14;
    let hour = 8 + i % 9;
    let mut text = format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Bench//EN\r\nBEGIN:VEVENT\r\nUID:{uid}\r\n\
         DTSTAMP:20261101T000000Z\r\nDTSTART;TZID=Europe/Berlin:202612{day:02}T{hour:02}0000\r\n\
         DTEND;TZID=Europe/Berlin:202612{day:02}T{hour:02}3000\r\nSUMMARY:{summary}\r\n\
         LOCATION:Room {}\r\nATTENDEE;CN=Ada:mailto:ada@example.com\r\n",
        i % 12
    );
    if recurring {
        text.push_str(&format!(
            "RRULE:FREQ=WEEKLY;COUNT=20\r\nEXDATE;TZID=Europe/Berlin:202612{:02}T{hour:02}0000\r\n\
             END:VEVENT\r\nBEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20261101T000000Z\r\n\
             RECURRENCE-ID;TZID=Europe/Berlin:202612{:02}T{hour:02}0000\r\n\
             DTSTART;TZID=Europe/Berlin:202612{:02}T{:02}0000\r\n\
             DTEND;TZID=Europe/Berlin:202612{:02}T{:02}3000\r\nSUMMARY:{summary} (moved)\r\n",
            day + 7,
            day + 14,
            day + 14,
            hour + 1,
            day + 14,
            hour + 1
        ));
    }
    text.push_str("END:VEVENT\r\nEND:VCALENDAR\r\n");
    text
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.recurring > args.events || args.events == 0 {
        bail!("--recurring is at most --events, and --events at least 1");
    }
    let root = tempfile::tempdir()?;
    let (ra, rb) = (
        Radicale::start(root.path(), "radicale-a", &["work"]).await?,
        Radicale::start(root.path(), "radicale-b", &["work"]).await?,
    );
    let started = Instant::now();
    for i in 0..args.events {
        let uid = format!("event-{i:05}");
        ra.put(
            "work",
            &uid,
            &event(i, i < args.recurring, &format!("Meeting {i}")),
        )
        .await?;
    }
    println!(
        "filled calendar A: {} events ({} recurring with a moved and a cancelled occurrence) in {:.1} s",
        args.events,
        args.recurring,
        started.elapsed().as_secs_f64()
    );

    let mut a = Node::new(root.path(), "a")?;
    let mut b = Node::new(root.path(), "b")?;
    let (addr_a, addr_b) = (free_udp_addr()?, free_udp_addr()?);
    let body = |server: &Radicale| {
        format!(
            "{}[[collection]]\nname = \"events\"\nnatural_key = [\"uid\"]\n\
             normalize = {{ uid = [\"trim\"] }}\n",
            server.tool("calendar", "work")
        )
    };
    a.configure_with(&addr_a, &[(b.id(), Some(addr_b.clone()))], &body(&ra))?;
    b.configure_with(&addr_b, &[(a.id(), Some(addr_a))], &body(&rb))?;
    let started = Instant::now();
    let (agent_a, agent_b) = (a.start().await?, b.start().await?);
    loop {
        if rb.hrefs("work").await?.len() >= args.events {
            break;
        }
        if started.elapsed() > SYNC_TIMEOUT {
            bail!("calendar B did not fill within {SYNC_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first = started.elapsed().as_secs_f64();
    println!(
        "first sync A -> B: {} events in {first:.2} s ({:.0} events/s), agents started to last event written",
        args.events,
        args.events as f64 / first
    );

    let mut latencies = Vec::with_capacity(args.edits);
    for n in 0..args.edits {
        let i = (n * 7919) % args.events;
        let uid = format!("event-{i:05}");
        let summary = format!("Edited {n}");
        let started = Instant::now();
        ra.put("work", &uid, &event(i, i < args.recurring, &summary))
            .await?;
        loop {
            let copy = rb.get("work", &uid).await?.context("the event on B")?;
            if copy.contains(&format!("SUMMARY:{summary}\r\n")) {
                break;
            }
            if started.elapsed() > EDIT_TIMEOUT {
                bail!("edit {n} did not reach B within {EDIT_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    if !latencies.is_empty() {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "one edit A -> B ({} edits, calendars polled every 100 ms): p50 {:.0} ms, max {:.0} ms",
            latencies.len(),
            ms(latencies[latencies.len() / 2]),
            ms(latencies[latencies.len() - 1])
        );
    }
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}
