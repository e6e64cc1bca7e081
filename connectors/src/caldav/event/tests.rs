use super::*;

fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    )
}

const SERIES: &str = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Test//EN\r\n\
BEGIN:VEVENT\r\nUID:standup@example.com\r\nDTSTAMP:20261101T000000Z\r\nSEQUENCE:3\r\n\
DTSTART;TZID=W. Europe Standard Time:20261005T090000\r\n\
DTEND;TZID=W. Europe Standard Time:20261005T091500\r\n\
RRULE:FREQ=WEEKLY;BYDAY=MO\r\n\
EXDATE;TZID=W. Europe Standard Time:20261012T090000\r\n\
SUMMARY;LANGUAGE=en:Stand-up\\, daily\r\nLOCATION:Room 1\r\n\
ATTENDEE;CN=Ada;PARTSTAT=ACCEPTED;SCHEDULE-STATUS=2.0:mailto:Ada@Example.com\r\n\
X-CUSTOM;X-P=1:kept\r\n\
BEGIN:VALARM\r\nTRIGGER:-PT15M\r\nACTION:DISPLAY\r\nDESCRIPTION:soon\r\nEND:VALARM\r\n\
END:VEVENT\r\n\
BEGIN:VEVENT\r\nUID:standup@example.com\r\nDTSTAMP:20261101T000000Z\r\n\
RECURRENCE-ID;TZID=W. Europe Standard Time:20261019T090000\r\n\
DTSTART;TZID=W. Europe Standard Time:20261019T100000\r\n\
DTEND;TZID=W. Europe Standard Time:20261019T101500\r\nSUMMARY:Stand-up (late)\r\n\
END:VEVENT\r\nEND:VCALENDAR\r\n";

#[test]
fn a_series_reads_in_normal_form() {
    let (uid, record) = read(SERIES).expect("reads");
    assert_eq!(uid, "standup@example.com");
    assert_eq!(record["summary"], Value::Text("Stand-up, daily".into()));
    // Windows zone names are mapped to IANA; times are instants.
    assert_eq!(record["start_zone"], Value::Text("Europe/Berlin".into()));
    let start = Utc
        .with_ymd_and_hms(2026, 10, 5, 7, 0, 0)
        .single()
        .expect("time");
    assert_eq!(
        record["start"],
        Value::Timestamp(Timestamp::from_micros(start.timestamp_micros()))
    );
    assert_eq!(record["rrule"], Value::Text("FREQ=WEEKLY;BYDAY=MO".into()));
    // 12 October is still summer time (CEST, UTC+2): the key is in UTC.
    assert_eq!(
        record["exdates"],
        map(&[("20261012T070000Z", Value::Bool(true))])
    );
    let Value::Map(overrides) = &record["overrides"] else {
        panic!("overrides is a map");
    };
    assert_eq!(overrides.len(), 1);
    let Value::Map(late) = &overrides["20261019T070000Z"] else {
        panic!("an override keyed by its UTC recurrence id");
    };
    assert_eq!(late["summary"], Value::Text("Stand-up (late)".into()));
    assert_eq!(
        record["attendees"],
        map(&[(
            "mailto:ada@example.com",
            map(&[
                ("cn", Value::Text("Ada".into())),
                ("partstat", Value::Text("ACCEPTED".into()))
            ])
        )])
    );
    assert_eq!(
        record["params"],
        map(&[("summary", Value::Text("LANGUAGE=en".into()))])
    );
    let Value::Text(extra) = &record["extra"] else {
        panic!("extra is kept");
    };
    assert!(extra.contains("X-CUSTOM;X-P=1:kept"), "{extra}");
    assert!(
        extra.contains("BEGIN:VALARM") && extra.contains("TRIGGER:-PT15M"),
        "{extra}"
    );
}

#[test]
fn what_concord_writes_reads_back_the_same_and_never_invites() {
    let (_, record) = read(SERIES).expect("reads");
    let written = write(&record, 4, Utc::now()).expect("writes");
    assert!(written.contains("SEQUENCE:4"), "{written}");
    assert!(written.contains("BEGIN:VTIMEZONE"), "{written}");
    assert!(written.contains("SCHEDULE-AGENT=CLIENT"), "{written}");
    assert!(!written.contains("SCHEDULE-STATUS"), "{written}");
    let (_, again) = read(&written).expect("reads back");
    assert_eq!(again, record);
}

#[test]
fn a_servers_rewrite_reads_as_the_same_record() {
    // Reordered properties, another DTSTAMP, a VTIMEZONE added, lines folded.
    let rewritten = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Server//EN\r\n\
BEGIN:VTIMEZONE\r\nTZID:Europe/Berlin\r\nBEGIN:STANDARD\r\nDTSTART:20001029T030000\r\n\
RRULE:FREQ=YEARLY;BYDAY=-1SU;BYMONTH=10\r\nTZOFFSETFROM:+0200\r\nTZOFFSETTO:+0100\r\n\
END:STANDARD\r\nEND:VTIMEZONE\r\n\
BEGIN:VEVENT\r\nUID:e1\r\nDTSTART;TZID=Europe/Berlin:20261124T100000\r\n\
DTEND;TZID=Europe/Berlin:20261124T110000\r\nDTSTAMP:20261124T120000Z\r\n\
SUMMARY:A long summary that the server folds over more than one line be\r\n cause it is long\r\n\
BEGIN:VALARM\r\nDESCRIPTION:r\r\nTRIGGER:-PT15M\r\nACTION:DISPLAY\r\nEND:VALARM\r\n\
X-FOO;X-P=1:bar\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
    let original = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VEVENT\r\nUID:e1\r\n\
DTSTAMP:20261124T000000Z\r\nDTSTART;TZID=Europe/Berlin:20261124T100000\r\n\
DTEND;TZID=Europe/Berlin:20261124T110000\r\n\
SUMMARY:A long summary that the server folds over more than one line because it is long\r\n\
X-FOO;X-P=1:bar\r\nBEGIN:VALARM\r\nACTION:DISPLAY\r\nTRIGGER:-PT15M\r\nDESCRIPTION:r\r\n\
END:VALARM\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
    assert_eq!(
        read(rewritten).expect("reads"),
        read(original).expect("reads")
    );
}

#[test]
fn all_day_events_stay_dates_with_an_exclusive_end() {
    let text = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VEVENT\r\nUID:off\r\n\
DTSTART;VALUE=DATE:20261224\r\nDURATION:P2D\r\nSUMMARY:Off\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
    let (_, record) = read(text).expect("reads");
    assert_eq!(record["start"], Value::Text("2026-12-24".into()));
    assert_eq!(record["end"], Value::Text("2026-12-26".into()));
    let written = write(&record, 0, Utc::now()).expect("writes");
    assert!(written.contains("DTSTART;VALUE=DATE:20261224"), "{written}");
    assert!(written.contains("DTEND;VALUE=DATE:20261226"), "{written}");
    assert_eq!(read(&written).expect("reads").1, record);
}

#[test]
fn floating_times_stay_floating() {
    let text = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VEVENT\r\nUID:f\r\n\
DTSTART:20261124T080000\r\nDTEND:20261124T083000\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
    let (_, record) = read(text).expect("reads");
    assert_eq!(record["start"], Value::Text("2026-11-24T08:00:00".into()));
    let written = write(&record, 0, Utc::now()).expect("writes");
    assert!(written.contains("DTSTART:20261124T080000\r\n"), "{written}");
}

#[test]
fn a_cancelled_and_overridden_occurrence_is_written_cancelled() {
    let (_, mut record) = read(SERIES).expect("reads");
    let Value::Map(exdates) = record.get_mut("exdates").expect("exdates") else {
        panic!("a map");
    };
    exdates.insert("20261019T070000Z".into(), Value::Bool(true));
    let written = write(&record, 0, Utc::now()).expect("writes");
    assert!(!written.contains("RECURRENCE-ID"), "{written}");
    assert!(
        written.contains("EXDATE;TZID=Europe/Berlin:20261019T090000"),
        "{written}"
    );
}

#[test]
fn tasks_are_not_events_and_junk_is_an_error() {
    let task = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VTODO\r\nUID:t\r\n\
SUMMARY:Task\r\nEND:VTODO\r\nEND:VCALENDAR\r\n";
    assert_eq!(read(task), Err(ReadError::NotAnEvent));
    let junk = "BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:j\r\nDTSTART:2026-11-24\r\n\
END:VEVENT\r\nEND:VCALENDAR\r\n";
    assert!(matches!(read(junk), Err(ReadError::Invalid(_))));
}
