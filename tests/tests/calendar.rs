//! Calendars: two real Radicale servers, one per agent, each started by the harness
//! with its own folder, htpasswd auth and a free loopback port, kept in two-way sync
//! by agents over real QUIC: single events, a weekly series in a zone crossing a
//! daylight-saving change, moved and cancelled occurrences, a moved series with
//! overrides, concurrent edits made while the agents were apart, all-day events,
//! properties and alarms Concord does not model, quiet after convergence, a 412, an
//! expired sync token, a crash mid-sync, and a SQLite `meetings` table joining the
//! same events through a mapping.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use concord_tests::radicale::{PASSWORD, Radicale, USER};
use concord_tests::{Node, Process, eventually, free_udp_addr};
use connectors::caldav::{CaldavConfig, CaldavConnector};
use connectors::{CollectionSpec, Connector, Cursor, OpOutcome, RowState, WriteOp};
use crdt_model::{Record, Value};

/// How events are matched: by UID, compared as written.
const EVENTS: &str = "[[collection]]\nname = \"events\"\nnatural_key = [\"uid\"]\n\
                      normalize = { uid = [\"trim\"] }\n";

/// Two agents, each syncing the `work` calendar of its own Radicale server.
async fn pair(root: &std::path::Path) -> anyhow::Result<(Node, Node, Radicale, Radicale)> {
    let (ra, rb) = (
        Radicale::start(root, "radicale-a", &["work"]).await?,
        Radicale::start(root, "radicale-b", &["work"]).await?,
    );
    let mut a = Node::new(root, "a")?;
    let mut b = Node::new(root, "b")?;
    let (addr_a, addr_b) = (free_udp_addr()?, free_udp_addr()?);
    let body = |server: &Radicale| format!("{}{EVENTS}", server.tool("calendar", "work"));
    a.configure_with(&addr_a, &[(b.id(), Some(addr_b.clone()))], &body(&ra))?;
    b.configure_with(&addr_b, &[(a.id(), Some(addr_a))], &body(&rb))?;
    Ok((a, b, ra, rb))
}

/// Waits until both servers hold the same events (as Concord reads them) and
/// `check` accepts them; returns them.
async fn agree(
    ra: &Radicale,
    rb: &Radicale,
    what: &str,
    check: impl Fn(&BTreeMap<String, Record>) -> bool,
) -> anyhow::Result<BTreeMap<String, Record>> {
    eventually(what, async || {
        let (a, b) = (ra.events("work").await?, rb.events("work").await?);
        Ok((a == b && check(&a)).then_some(a))
    })
    .await
}

fn text(record: &Record, field: &str) -> Option<String> {
    match record.get(field) {
        Some(Value::Text(t)) => Some(t.clone()),
        _ => None,
    }
}

fn map_keys(record: &Record, field: &str) -> Vec<String> {
    match record.get(field) {
        Some(Value::Map(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

fn vevent(uid: &str, lines: &str) -> String {
    format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Test app//EN\r\nBEGIN:VEVENT\r\nUID:{uid}\r\n\
         DTSTAMP:20261101T000000Z\r\n{lines}END:VEVENT\r\nEND:VCALENDAR\r\n"
    )
}

/// A weekly stand-up on Mondays at 09:00 Berlin time from 5 October 2026: the
/// clocks go back on 25 October, and the meeting stays at 09:00 local.
fn standup(extra: &str) -> String {
    format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Test app//EN\r\nBEGIN:VEVENT\r\n\
         UID:standup\r\nDTSTAMP:20261101T000000Z\r\n\
         DTSTART;TZID=Europe/Berlin:20261005T090000\r\nDTEND;TZID=Europe/Berlin:20261005T091500\r\n\
         RRULE:FREQ=WEEKLY;BYDAY=MO;COUNT=10\r\nSUMMARY:Stand-up\r\n{extra}END:VEVENT\r\n\
         END:VCALENDAR\r\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn single_events_sync_both_ways_and_the_agents_go_quiet() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (a, b, ra, rb) = pair(root.path()).await?;
    let (agent_a, agent_b) = (a.start().await?, b.start().await?);

    ra.put(
        "work",
        "lunch",
        &vevent(
            "lunch",
            "DTSTART:20261125T120000Z\r\nDTEND:20261125T130000Z\r\nSUMMARY:Lunch\r\n\
             LOCATION:Canteen\r\nDESCRIPTION:Bring the plan\\, please\r\n\
             ATTENDEE;CN=Grace;PARTSTAT=NEEDS-ACTION:mailto:grace@example.com\r\n",
        ),
    )
    .await?;
    let events = agree(&ra, &rb, "the lunch on both servers", |e| {
        e.contains_key("lunch")
    })
    .await?;
    assert_eq!(
        text(&events["lunch"], "location").as_deref(),
        Some("Canteen")
    );
    assert_eq!(
        text(&events["lunch"], "description").as_deref(),
        Some("Bring the plan, please")
    );
    // Concord's copy never asks the server to invite anyone.
    let copy = rb.get("work", "lunch").await?.context("the copy on B")?;
    assert!(copy.contains("SCHEDULE-AGENT=CLIENT"), "{copy}");

    // Edited on B, back on A.
    let edited = copy.replace("SUMMARY:Lunch", "SUMMARY:Team lunch");
    rb.put("work", "lunch", &edited).await?;
    agree(&ra, &rb, "the new summary on A", |e| {
        e.get("lunch").and_then(|r| text(r, "summary")).as_deref() == Some("Team lunch")
    })
    .await?;

    // Quiet: once converged, several polls later nothing was written again.
    let (before_a, before_b) = (ra.hrefs("work").await?, rb.hrefs("work").await?);
    let written = |agent: &concord_agent::agent::RunningAgent| -> u64 {
        agent
            .telemetry()
            .status()
            .tools
            .iter()
            .map(|t| t.written)
            .sum()
    };
    let (written_a, written_b) = (written(&agent_a), written(&agent_b));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        ra.hrefs("work").await?,
        before_a,
        "A's calendar changed again"
    );
    assert_eq!(
        rb.hrefs("work").await?,
        before_b,
        "B's calendar changed again"
    );
    assert_eq!(
        (written(&agent_a), written(&agent_b)),
        (written_a, written_b)
    );

    // Deleted on A, gone from B.
    ra.delete("work", "lunch").await?;
    agree(&ra, &rb, "the lunch gone from both", |e| e.is_empty()).await?;
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_series_keeps_its_time_across_daylight_saving_and_its_exceptions_merge()
-> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (a, b, ra, rb) = pair(root.path()).await?;
    let (agent_a, agent_b) = (a.start().await?, b.start().await?);
    ra.put("work", "standup", &standup("")).await?;
    let events = agree(&ra, &rb, "the series on B", |e| e.contains_key("standup")).await?;
    assert_eq!(
        text(&events["standup"], "rrule").as_deref(),
        Some("FREQ=WEEKLY;COUNT=10;BYDAY=MO")
    );
    // The series is written in its zone, so occurrences after 25 October stay at
    // 09:00 Berlin time (08:00 UTC) rather than 09:00 summer time (07:00 UTC).
    let copy = rb.get("work", "standup").await?.context("the copy")?;
    assert!(
        copy.contains("DTSTART;TZID=Europe/Berlin:20261005T090000"),
        "{copy}"
    );
    assert!(copy.contains("BEGIN:VTIMEZONE"), "{copy}");

    // On A, 19 October moves to 10:00; on B, 12 October is cancelled.
    let moved = standup(
        "END:VEVENT\r\nBEGIN:VEVENT\r\nUID:standup\r\nDTSTAMP:20261101T000000Z\r\n\
         RECURRENCE-ID;TZID=Europe/Berlin:20261019T090000\r\n\
         DTSTART;TZID=Europe/Berlin:20261019T100000\r\nDTEND;TZID=Europe/Berlin:20261019T101500\r\n\
         SUMMARY:Stand-up (late)\r\n",
    );
    ra.put("work", "standup", &moved).await?;
    let cancelled = rb
        .get("work", "standup")
        .await?
        .context("B's copy")?
        .replace(
            "RRULE:",
            "EXDATE;TZID=Europe/Berlin:20261012T090000\r\nRRULE:",
        );
    rb.put("work", "standup", &cancelled).await?;
    let events = agree(&ra, &rb, "both exceptions on both servers", |e| {
        e.get("standup").is_some_and(|r| {
            map_keys(r, "exdates") == ["20261012T070000Z"]
                && map_keys(r, "overrides") == ["20261019T070000Z"]
        })
    })
    .await?;
    let Some(Value::Map(overrides)) = events["standup"].get("overrides") else {
        panic!("overrides");
    };
    let Value::Map(late) = &overrides["20261019T070000Z"] else {
        panic!("the moved occurrence");
    };
    assert_eq!(late["summary"], Value::Text("Stand-up (late)".into()));

    // The series moves to 11:00, its exceptions with it (as calendar apps do).
    let series = ra.get("work", "standup").await?.context("A's copy")?;
    let shifted = series
        .replace(
            "DTSTART;TZID=Europe/Berlin:20261005T090000",
            "DTSTART;TZID=Europe/Berlin:20261005T110000",
        )
        .replace(
            "DTEND;TZID=Europe/Berlin:20261005T091500",
            "DTEND;TZID=Europe/Berlin:20261005T111500",
        )
        .replace(
            "RECURRENCE-ID;TZID=Europe/Berlin:20261019T090000",
            "RECURRENCE-ID;TZID=Europe/Berlin:20261019T110000",
        )
        .replace(
            "EXDATE;TZID=Europe/Berlin:20261012T090000",
            "EXDATE;TZID=Europe/Berlin:20261012T110000",
        );
    assert_ne!(shifted, series, "the test's edit applies");
    ra.put("work", "standup", &shifted).await?;
    agree(&ra, &rb, "the moved series on both servers", |e| {
        e.get("standup").is_some_and(|r| {
            map_keys(r, "exdates") == ["20261012T090000Z"]
                && map_keys(r, "overrides") == ["20261019T090000Z"]
        })
    })
    .await?;
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_edits_made_apart_merge_field_by_field() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (a, b, ra, rb) = pair(root.path()).await?;
    let (agent_a, agent_b) = (a.start().await?, b.start().await?);
    ra.put(
        "work",
        "standup",
        &standup("LOCATION:Room 1\r\nDESCRIPTION:Daily\r\n"),
    )
    .await?;
    agree(&ra, &rb, "the series on B", |e| e.contains_key("standup")).await?;
    agent_a.shutdown().await;
    agent_b.shutdown().await;

    // Apart: A renames the series, moves 19 October and edits the description; B
    // moves the room, cancels 19 October and edits the description later.
    let on_a = ra.get("work", "standup").await?.context("A's copy")?;
    let on_a = on_a
        .replace("SUMMARY:Stand-up", "SUMMARY:Team stand-up")
        .replace("DESCRIPTION:Daily", "DESCRIPTION:From A")
        .replace(
            "END:VEVENT\r\nEND:VCALENDAR",
            "END:VEVENT\r\nBEGIN:VEVENT\r\nUID:standup\r\nDTSTAMP:20261101T000000Z\r\n\
             RECURRENCE-ID;TZID=Europe/Berlin:20261019T090000\r\n\
             DTSTART;TZID=Europe/Berlin:20261019T100000\r\n\
             DTEND;TZID=Europe/Berlin:20261019T101500\r\nSUMMARY:Moved\r\nEND:VEVENT\r\nEND:VCALENDAR",
        );
    ra.put("work", "standup", &on_a).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let on_b = rb.get("work", "standup").await?.context("B's copy")?;
    let on_b = on_b
        .replace("LOCATION:Room 1", "LOCATION:Room 2")
        .replace("DESCRIPTION:Daily", "DESCRIPTION:From B")
        .replace(
            "RRULE:",
            "EXDATE;TZID=Europe/Berlin:20261019T090000\r\nRRULE:",
        );
    rb.put("work", "standup", &on_b).await?;

    let (agent_a, agent_b) = (a.start().await?, b.start().await?);
    let events = agree(&ra, &rb, "the merged series on both servers", |e| {
        e.get("standup").is_some_and(|r| {
            text(r, "summary").as_deref() == Some("Team stand-up")
                && text(r, "location").as_deref() == Some("Room 2")
                && map_keys(r, "exdates") == ["20261019T070000Z"]
        })
    })
    .await?;
    let series = &events["standup"];
    // The same field edited on both sides: the later edit (B's) wins everywhere.
    assert_eq!(text(series, "description").as_deref(), Some("From B"));
    // The occurrence both moved and cancelled is cancelled in both calendars.
    assert!(map_keys(series, "overrides").is_empty(), "{series:?}");
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn all_day_events_zones_alarms_and_x_properties_survive_a_round_trip() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (a, b, ra, rb) = pair(root.path()).await?;
    let (agent_a, agent_b) = (a.start().await?, b.start().await?);
    ra.put(
        "work",
        "offsite",
        &vevent(
            "offsite",
            "DTSTART;VALUE=DATE:20261210\r\nDTEND;VALUE=DATE:20261212\r\nSUMMARY:Offsite\r\n\
             X-APP-COLOR;X-SHADE=dark:teal\r\nBEGIN:VALARM\r\nACTION:DISPLAY\r\n\
             DESCRIPTION:Pack\r\nTRIGGER:-P1D\r\nEND:VALARM\r\n",
        ),
    )
    .await?;
    ra.put(
        "work",
        "review",
        &vevent(
            "review",
            "DTSTART;TZID=W. Europe Standard Time:20261126T150000\r\n\
             DTEND;TZID=W. Europe Standard Time:20261126T160000\r\nSUMMARY:Review\r\n",
        ),
    )
    .await?;
    let events = agree(&ra, &rb, "both events on B", |e| e.len() == 2).await?;
    assert_eq!(
        text(&events["offsite"], "start").as_deref(),
        Some("2026-12-10")
    );
    assert_eq!(
        text(&events["offsite"], "end").as_deref(),
        Some("2026-12-12")
    );
    assert_eq!(
        text(&events["review"], "start_zone").as_deref(),
        Some("Europe/Berlin")
    );
    let copy = rb.get("work", "offsite").await?.context("B's copy")?;
    assert!(copy.contains("DTSTART;VALUE=DATE:20261210"), "{copy}");

    // B renames it; A's own alarm and X- property are still there after the trip.
    rb.put(
        "work",
        "offsite",
        &copy.replace("SUMMARY:Offsite", "SUMMARY:Offsite in Lyon"),
    )
    .await?;
    agree(&ra, &rb, "the rename on A", |e| {
        e.get("offsite").and_then(|r| text(r, "summary")).as_deref() == Some("Offsite in Lyon")
    })
    .await?;
    let back = ra.get("work", "offsite").await?.context("A's event")?;
    assert!(back.contains("X-APP-COLOR;X-SHADE=dark:teal"), "{back}");
    assert!(
        back.contains("BEGIN:VALARM") && back.contains("TRIGGER:-P1D"),
        "{back}"
    );
    assert!(back.contains("DTEND;VALUE=DATE:20261212"), "{back}");
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

fn connector(server: &Radicale, state: &std::path::Path) -> anyhow::Result<CaldavConnector> {
    let config = CaldavConfig {
        url: server.url.clone(),
        user: Some((USER.to_owned(), PASSWORD.to_owned())),
        poll_interval: Duration::from_millis(100),
        state: state.to_owned(),
    };
    let spec = CollectionSpec {
        collection: "events".into(),
        table: "work".into(),
        primary_key: "uid".into(),
        columns: connectors::caldav::all_fields(),
    };
    Ok(CaldavConnector::open(&config, vec![spec])?)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outside_edit_makes_the_write_stale_and_is_captured_not_overwritten()
-> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Radicale::start(root.path(), "radicale", &["work"]).await?;
    server
        .put(
            "work",
            "lunch",
            &vevent("lunch", "DTSTART:20261125T120000Z\r\nSUMMARY:Lunch\r\n"),
        )
        .await?;
    let state = root.path().join("state");
    let mut calendar = tokio::task::block_in_place(|| connector(&server, &state))?;
    let batch = tokio::task::block_in_place(|| calendar.capture(&Cursor::start(), 100))?;
    assert_eq!(batch.changes.len(), 1);

    // Someone edits the event after Concord read it.
    let current = server.get("work", "lunch").await?.context("the event")?;
    server
        .put(
            "work",
            "lunch",
            &current.replace("SUMMARY:Lunch", "SUMMARY:Brunch"),
        )
        .await?;
    let write = WriteOp::Upsert {
        collection: "events".into(),
        key: "lunch".into(),
        fields: Record::from([("location".to_owned(), Value::Text("Canteen".into()))]),
    };
    let outcomes = tokio::task::block_in_place(|| {
        calendar.write_back(&batch.cursor, &HashSet::new(), &[write])
    })?;
    assert_eq!(outcomes, [OpOutcome::Stale], "the 412 is a stale write");
    let after = server.get("work", "lunch").await?.context("the event")?;
    assert!(
        after.contains("SUMMARY:Brunch") && !after.contains("Canteen"),
        "{after}"
    );

    // The next capture brings the outside edit, to merge and plan again.
    let next = tokio::task::block_in_place(|| calendar.capture(&batch.cursor, 100))?;
    let RowState::Present(record) = &next.changes[0].state else {
        panic!("the edited event");
    };
    assert_eq!(text(record, "summary").as_deref(), Some("Brunch"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_sync_token_resyncs_without_duplicating_or_deleting() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Radicale::start(root.path(), "radicale", &["work"]).await?;
    for uid in ["one", "two", "three"] {
        server
            .put(
                "work",
                uid,
                &vevent(uid, "DTSTART:20261125T120000Z\r\nSUMMARY:Event\r\n"),
            )
            .await?;
    }
    let state = root.path().join("state");
    let mut calendar = tokio::task::block_in_place(|| connector(&server, &state))?;
    let batch = tokio::task::block_in_place(|| calendar.capture(&Cursor::start(), 100))?;
    assert_eq!(batch.changes.len(), 3);

    // While the agent is away, one event is deleted and the server forgets tokens.
    server.delete("work", "two").await?;
    let expired = Cursor(br#"{"events":"http://radicale.org/ns/sync/0000"}"#.to_vec());
    let resync = tokio::task::block_in_place(|| calendar.capture(&expired, 100))?;
    let mut keys: Vec<(String, bool)> = resync
        .changes
        .iter()
        .map(|c| (c.key.clone(), matches!(c.state, RowState::Absent)))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            ("one".to_owned(), false),
            ("three".to_owned(), false),
            ("two".to_owned(), true)
        ],
        "each event once; only the one deleted is a delete"
    );
    assert_ne!(resync.cursor, expired, "a fresh token is stored");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_mid_sync_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    const EVENTS_N: usize = 300;
    let root = tempfile::tempdir()?;
    let (a, b, ra, rb) = pair(root.path()).await?;
    for i in 0..EVENTS_N {
        let uid = format!("event-{i:03}");
        ra.put(
            "work",
            &uid,
            &vevent(
                &uid,
                &format!(
                    "DTSTART:20261201T{:02}0000Z\r\nSUMMARY:Event {i}\r\n",
                    i % 24
                ),
            ),
        )
        .await?;
    }
    let (pa, pb) = (Process::start(&a)?, Process::start(&b)?);
    // Kill B while it is writing the events into its calendar.
    eventually("B to start writing", async || {
        Ok((!rb.hrefs("work").await?.is_empty()).then_some(()))
    })
    .await?;
    pb.kill9()?;
    let written = rb.hrefs("work").await?.len();
    let pb = Process::start(&b)?;
    let events = agree(&ra, &rb, "every event on B, once", |e| e.len() == EVENTS_N).await?;
    assert_eq!(rb.hrefs("work").await?.len(), EVENTS_N, "no event twice");
    assert!(events.contains_key("event-299"));
    eprintln!("B was killed after writing {written} of {EVENTS_N} events");
    pa.stop()?;
    pb.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_meetings_table_and_a_calendar_share_the_same_events() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Radicale::start(root.path(), "radicale", &["work"]).await?;
    let mut office = Node::with_schema(
        root.path(),
        "office",
        "CREATE TABLE customers (id INTEGER PRIMARY KEY);
         CREATE TABLE meetings (id INTEGER PRIMARY KEY, subject TEXT, starts TEXT, ends TEXT)",
    )?;
    let mut cal = Node::new(root.path(), "calendar")?;
    let (addr_o, addr_c) = (free_udp_addr()?, free_udp_addr()?);
    let meetings = "[[tool]]\nname = \"office\"\nkind = \"sqlite\"\npath = \"app.db\"\n\n\
         [[tool.collection]]\nname = \"events\"\ntable = \"meetings\"\nprimary_key = \"id\"\n\n\
         [[tool.collection.field]]\ncolumn = \"subject\"\nfield = \"summary\"\n\n\
         [[tool.collection.field]]\ncolumn = \"starts\"\nfield = \"start\"\nconvert = \"timestamp\"\n\
         format = \"%Y-%m-%d %H:%M\"\ntimezone = \"Europe/Berlin\"\n\n\
         [[tool.collection.field]]\ncolumn = \"ends\"\nfield = \"end\"\nconvert = \"timestamp\"\n\
         format = \"%Y-%m-%d %H:%M\"\ntimezone = \"Europe/Berlin\"\n";
    office.configure_with(&addr_o, &[(cal.id(), Some(addr_c.clone()))], meetings)?;
    cal.configure_with(
        &addr_c,
        &[(office.id(), Some(addr_o))],
        &server.tool("calendar", "work"),
    )?;
    let (agent_o, agent_c) = (office.start().await?, cal.start().await?);

    // A meeting booked in the office database appears in the calendar, in UTC.
    office.db()?.execute(
        "INSERT INTO meetings (subject, starts, ends) VALUES ('Budget', '2026-11-30 14:00', '2026-11-30 15:00')",
        [],
    )?;
    let events = eventually("the meeting in the calendar", async || {
        let events = server.events("work").await?;
        Ok((events.len() == 1).then_some(events))
    })
    .await?;
    let (uid, budget) = events.iter().next().context("one event")?;
    assert_eq!(text(budget, "summary").as_deref(), Some("Budget"));
    let ics = server.get_href(&format!("/{USER}/work/{uid}.ics")).await?;
    assert!(ics.contains("DTSTART:20261130T130000Z"), "{ics}");

    // Moved in the calendar, the meeting moves in the database, in Berlin time.
    server
        .put_href(
            &format!("/{USER}/work/{uid}.ics"),
            &ics.replace("DTSTART:20261130T130000Z", "DTSTART:20261130T140000Z")
                .replace("SUMMARY:Budget", "SUMMARY:Budget review"),
        )
        .await?;
    let rows = eventually("the move in the database", async || {
        let rows: Vec<(String, String)> = office
            .db()?
            .prepare("SELECT subject, starts FROM meetings")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok((rows.first().map(|r| r.1.as_str()) == Some("2026-11-30 15:00")).then_some(rows))
    })
    .await?;
    assert_eq!(
        rows,
        [("Budget review".to_owned(), "2026-11-30 15:00".to_owned())]
    );

    // An event made in the calendar becomes a meeting row.
    server
        .put(
            "work",
            "retro",
            &vevent(
                "retro",
                "DTSTART:20261201T090000Z\r\nDTEND:20261201T100000Z\r\nSUMMARY:Retro\r\n",
            ),
        )
        .await?;
    eventually("the retro in the database", async || {
        let found: Option<String> = office
            .db()?
            .query_row(
                "SELECT starts FROM meetings WHERE subject = 'Retro'",
                [],
                |r| r.get(0),
            )
            .ok();
        Ok((found.as_deref() == Some("2026-12-01 10:00")).then_some(()))
    })
    .await?;
    agent_o.shutdown().await;
    agent_c.shutdown().await;
    Ok(())
}
