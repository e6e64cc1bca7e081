//! The CSV file format as users' tools write it: reading a file into a header and
//! rows, and writing it back byte for byte as it was except for the rows changed.
//!
//! A file is read whole. What the `csv` crate does not report is found by a pass of
//! our own over the bytes: the delimiter (when not configured), whether the header's
//! fields are all quoted, the line ending, a BOM, a final line break, and a quoted
//! field left open at the end (a file caught half-written). Rows keep their byte
//! span in the file, so a row that was not changed is written back verbatim.

use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::CsvError;

/// The UTF-8 byte order mark some tools (Excel) put at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Largest file the connector reads: a file is held in memory whole.
pub(super) const FILE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// The delimiters recognized in a header line, the preferred first on a tie.
const DELIMITERS: [u8; 4] = [b',', b';', b'\t', b'|'];

/// How a file is written: what is kept of the file as it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Format {
    /// The field delimiter.
    pub(super) delimiter: u8,
    /// The file starts with a UTF-8 BOM.
    pub(super) bom: bool,
    /// Lines end with `\r\n` (the header line did).
    pub(super) crlf: bool,
    /// Every field is quoted (every header field was).
    pub(super) quote_all: bool,
    /// The file ends with a line break.
    pub(super) final_break: bool,
}

impl Format {
    /// The format of a file Concord creates: no BOM, `\n`, quotes where needed.
    pub(super) fn new(delimiter: u8) -> Format {
        Format {
            delimiter,
            bom: false,
            crlf: false,
            quote_all: false,
            final_break: true,
        }
    }

    /// One record in this format, without a line break. A record that cannot be
    /// written (never, into memory) is left empty, and the check of what is written
    /// against the rows finds it.
    fn record(&self, cells: &[String]) -> Vec<u8> {
        let mut writer = ::csv::WriterBuilder::new()
            .delimiter(self.delimiter)
            .quote_style(if self.quote_all {
                ::csv::QuoteStyle::Always
            } else {
                ::csv::QuoteStyle::Necessary
            })
            // CRLF also quotes a lone `\r`, which a reader takes for a line break.
            .terminator(::csv::Terminator::CRLF)
            .from_writer(Vec::new());
        if writer.write_record(cells).is_err() {
            return Vec::new();
        }
        let mut bytes = writer.into_inner().unwrap_or_default();
        bytes.truncate(bytes.len().saturating_sub(2));
        bytes
    }

    fn line_break(&self) -> &'static [u8] {
        if self.crlf { b"\r\n" } else { b"\n" }
    }
}

/// One row of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Row {
    /// The line the row starts on (1-based), for messages; 0 for a new row.
    pub(super) line: u64,
    /// The row's cells, one per header column.
    pub(super) cells: Vec<String>,
    /// The row's bytes in the file it was read from, without line breaks; `None`
    /// once a cell changed.
    raw: Option<Range<usize>>,
    /// The row is removed when the file is written.
    pub(super) deleted: bool,
}

impl Row {
    /// A new row to append, with `width` empty cells.
    pub(super) fn new(width: usize) -> Row {
        Row {
            line: 0,
            cells: vec![String::new(); width],
            raw: None,
            deleted: false,
        }
    }

    /// Sets cell `column` to `text`; the row is written anew only if it changed.
    pub(super) fn set(&mut self, column: usize, text: String) {
        if let Some(cell) = self.cells.get_mut(column)
            && *cell != text
        {
            *cell = text;
            self.raw = None;
        }
    }
}

/// A file read whole.
#[derive(Debug, Clone)]
pub(super) struct Sheet {
    /// How the file is written back.
    pub(super) format: Format,
    /// The header's column names.
    pub(super) header: Vec<String>,
    /// The header's bytes in `source`, without the line break.
    header_raw: Option<Range<usize>>,
    /// The rows, in file order.
    pub(super) rows: Vec<Row>,
    /// The file's bytes as read.
    source: Vec<u8>,
}

impl Sheet {
    /// A file with only a header line, as Concord creates it.
    pub(super) fn empty(format: Format, header: Vec<String>) -> Sheet {
        Sheet {
            format,
            header,
            header_raw: None,
            rows: Vec::new(),
            source: Vec::new(),
        }
    }

    /// Reads `bytes`, the content of file `name`. `delimiter` is the configured one;
    /// `None` detects it from the header line. A file without a header (empty) is
    /// `Ok(None)`.
    pub(super) fn parse(
        name: &str,
        bytes: Vec<u8>,
        delimiter: Option<u8>,
    ) -> Result<Option<Sheet>, CsvError> {
        let start = if bytes.starts_with(BOM) { BOM.len() } else { 0 };
        let text = std::str::from_utf8(&bytes[start..]).map_err(|e| {
            let offset = start + e.valid_up_to();
            CsvError::NotUtf8 {
                file: name.to_owned(),
                offset: offset as u64,
                line: line_at(&bytes, offset),
            }
        })?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        let delimiter = delimiter.unwrap_or_else(|| detect_delimiter(text.as_bytes()));
        let scan = scan(text.as_bytes(), delimiter).map_err(|line| CsvError::UnclosedQuote {
            file: name.to_owned(),
            line,
        })?;
        let records = records(name, text, delimiter, start)?;
        let ends: Vec<usize> = records
            .iter()
            .skip(1)
            .map(|(_, byte, _)| *byte)
            .chain([bytes.len()])
            .collect();
        let mut records = records.into_iter().zip(ends);
        let Some(((_, header_start, header), header_end)) = records.next() else {
            return Ok(None);
        };
        let rows = records
            .map(|((line, begin, cells), end)| Row {
                line,
                cells,
                raw: Some(content(&bytes, begin..end)),
                deleted: false,
            })
            .collect();
        let format = Format {
            delimiter,
            bom: start > 0,
            crlf: scan.header_crlf,
            quote_all: scan.header_quoted,
            final_break: bytes.ends_with(b"\n") || bytes.ends_with(b"\r"),
        };
        Ok(Some(Sheet {
            format,
            header,
            header_raw: Some(content(&bytes, header_start..header_end)),
            rows,
            source: bytes,
        }))
    }

    /// The file's bytes: rows not changed as they were read, changed and new rows
    /// written in the file's format, deleted rows left out.
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.source.len() + 256);
        if self.format.bom {
            out.extend_from_slice(BOM);
        }
        let put = |out: &mut Vec<u8>, raw: &Option<Range<usize>>, cells: &[String]| match raw {
            Some(raw) => out.extend_from_slice(&self.source[raw.clone()]),
            None => out.extend_from_slice(&self.format.record(cells)),
        };
        put(&mut out, &self.header_raw, &self.header);
        for row in self.rows.iter().filter(|row| !row.deleted) {
            out.extend_from_slice(self.format.line_break());
            put(&mut out, &row.raw, &row.cells);
        }
        if self.format.final_break {
            out.extend_from_slice(self.format.line_break());
        }
        out
    }
}

/// Each record of `text` (which starts at byte `start` of the file): its line, the
/// byte it starts at in the file, and its cells.
fn records(
    name: &str,
    text: &str,
    delimiter: u8,
    start: usize,
) -> Result<Vec<(u64, usize, Vec<String>)>, CsvError> {
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(false)
        .delimiter(delimiter)
        .from_reader(text.as_bytes());
    let mut records = Vec::new();
    let mut record = ::csv::StringRecord::new();
    while reader
        .read_record(&mut record)
        .map_err(|e| record_error(name, &e))?
    {
        let (line, byte) = record
            .position()
            .map_or((0, 0), |p| (p.line(), p.byte() as usize));
        records.push((
            line,
            start + byte,
            record.iter().map(str::to_owned).collect(),
        ));
    }
    Ok(records)
}

/// The record's bytes without the line breaks (and blank lines) around it. An
/// unquoted field holds no line break, and a quoted one ends in a quote, so only
/// breaks between records are cut.
fn content(bytes: &[u8], range: Range<usize>) -> Range<usize> {
    let slice = &bytes[range.clone()];
    let is_break = |b: &u8| *b == b'\r' || *b == b'\n';
    let lead = slice.iter().take_while(|b| is_break(b)).count();
    let trail = slice[lead..]
        .iter()
        .rev()
        .take_while(|b| is_break(b))
        .count();
    range.start + lead..range.end - trail
}

/// The line (1-based) of byte `offset`.
fn line_at(bytes: &[u8], offset: usize) -> u64 {
    1 + bytes[..offset.min(bytes.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64
}

fn record_error(name: &str, error: &::csv::Error) -> CsvError {
    let line = error.position().map_or(0, ::csv::Position::line);
    match error.kind() {
        ::csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => CsvError::FieldCount {
            file: name.to_owned(),
            line,
            found: *len,
            expected: *expected_len,
        },
        _ => CsvError::Malformed {
            file: name.to_owned(),
            line,
            message: error.to_string(),
        },
    }
}

/// The most frequent of `, ; TAB |` in the first line, outside quotes; `,` when
/// none is there.
fn detect_delimiter(text: &[u8]) -> u8 {
    let mut counts = [0usize; DELIMITERS.len()];
    let mut quoted = false;
    let first = text.iter().skip_while(|b| **b == b'\r' || **b == b'\n');
    for &b in first {
        match b {
            b'"' => quoted = !quoted,
            b'\r' | b'\n' if !quoted => break,
            _ if !quoted => {
                if let Some(i) = DELIMITERS.iter().position(|d| *d == b) {
                    counts[i] += 1;
                }
            }
            _ => {}
        }
    }
    let mut best = 0;
    for i in 1..DELIMITERS.len() {
        if counts[i] > counts[best] {
            best = i;
        }
    }
    DELIMITERS[best]
}

/// What a pass over the bytes finds of the header line.
#[derive(Debug)]
struct Scan {
    /// Every header field starts with a quote.
    header_quoted: bool,
    /// The header line ends with `\r\n`.
    header_crlf: bool,
}

/// Walks the bytes as `csv-core` reads them (a quote opens a field only at its
/// start, `""` inside one is a quote); the error is the line of a quoted field that
/// is still open at the end of the file.
fn scan(text: &[u8], delimiter: u8) -> Result<Scan, u64> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        RecordStart,
        FieldStart,
        Unquoted,
        Quoted,
        QuoteInQuoted,
    }
    let mut state = State::RecordStart;
    let mut line = 1;
    let mut opened = 1;
    let mut record = 0usize;
    let (mut fields, mut quoted_fields) = (0usize, 0usize);
    let mut header_crlf = false;
    for (i, &b) in text.iter().enumerate() {
        if state == State::RecordStart {
            if b == b'\r' || b == b'\n' {
                line += u64::from(b == b'\n');
                continue;
            }
            state = State::FieldStart;
        }
        let end_of_record = |record: &mut usize, header_crlf: &mut bool| {
            if *record == 0 {
                *header_crlf = b == b'\r' && text.get(i + 1) == Some(&b'\n');
            }
            *record += 1;
        };
        state = match state {
            State::FieldStart | State::Unquoted if b == b'\r' || b == b'\n' => {
                if record == 0 && state == State::FieldStart {
                    fields += 1;
                }
                end_of_record(&mut record, &mut header_crlf);
                State::RecordStart
            }
            State::FieldStart if b == delimiter => {
                fields += usize::from(record == 0);
                State::FieldStart
            }
            State::FieldStart if b == b'"' => {
                if record == 0 {
                    fields += 1;
                    quoted_fields += 1;
                }
                opened = line;
                State::Quoted
            }
            State::FieldStart => {
                fields += usize::from(record == 0);
                State::Unquoted
            }
            State::Unquoted | State::QuoteInQuoted if b == delimiter => State::FieldStart,
            State::QuoteInQuoted if b == b'\r' || b == b'\n' => {
                end_of_record(&mut record, &mut header_crlf);
                State::RecordStart
            }
            State::Quoted if b == b'"' => State::QuoteInQuoted,
            State::QuoteInQuoted if b == b'"' => State::Quoted,
            State::QuoteInQuoted => State::Unquoted,
            other => other,
        };
        line += u64::from(b == b'\n');
    }
    if state == State::Quoted {
        return Err(opened);
    }
    if record == 0 && state == State::FieldStart {
        // The header ends at the end of the file with an empty field.
        fields += 1;
    }
    Ok(Scan {
        header_quoted: fields > 0 && quoted_fields == fields,
        header_crlf,
    })
}

/// Reads only the header of file `name` (its first record): its column names and
/// delimiter, or `None` for an empty file.
pub(super) fn read_header(
    name: &str,
    bytes: &[u8],
    delimiter: Option<u8>,
) -> Result<Option<(Vec<String>, u8)>, CsvError> {
    let start = if bytes.starts_with(BOM) { BOM.len() } else { 0 };
    let text = &bytes[start..];
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let delimiter = delimiter.unwrap_or_else(|| detect_delimiter(text));
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .delimiter(delimiter)
        .from_reader(text);
    let mut record = ::csv::ByteRecord::new();
    if !reader
        .read_byte_record(&mut record)
        .map_err(|e| record_error(name, &e))?
    {
        return Ok(None);
    }
    let end = (reader.position().byte() as usize).min(text.len());
    if let Err(e) = std::str::from_utf8(&text[..end]) {
        let offset = start + e.valid_up_to();
        return Err(CsvError::NotUtf8 {
            file: name.to_owned(),
            offset: offset as u64,
            line: line_at(bytes, offset),
        });
    }
    let header = record
        .iter()
        .map(|field| String::from_utf8_lossy(field).into_owned())
        .collect();
    Ok(Some((header, delimiter)))
}

/// What a file's metadata says of its content, compared to tell whether it changed
/// without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stat {
    len: u64,
    modified: Option<SystemTime>,
    /// Device and inode: a file replaced by a rename is another file.
    identity: (u64, u64),
}

impl Stat {
    /// The file's stat; `None` when it does not exist.
    pub(super) fn of(path: &Path) -> std::io::Result<Option<Stat>> {
        match fs::metadata(path) {
            Ok(metadata) => Ok(Some(Stat {
                len: metadata.len(),
                modified: metadata.modified().ok(),
                identity: identity(&metadata),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// How long ago the file was modified; `None` when unknown or in the future.
    pub(super) fn age(&self) -> Option<std::time::Duration> {
        self.modified
            .and_then(|m| SystemTime::now().duration_since(m).ok())
    }
}

#[cfg(unix)]
fn identity(metadata: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

#[cfg(not(unix))]
fn identity(_metadata: &fs::Metadata) -> (u64, u64) {
    (0, 0)
}

/// The lock file a spreadsheet program keeps next to `path` while the file is open
/// in it: LibreOffice's `.~lock.<name>#`, Excel's `~$<name>` (Excel drops the first
/// two characters of a long name).
pub(super) fn lock_file(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let folder = path.parent()?;
    let short: String = name.chars().skip(2).collect();
    let mut candidates = vec![format!(".~lock.{name}#"), format!("~${name}")];
    if !short.is_empty() {
        candidates.push(format!("~${short}"));
    }
    candidates
        .into_iter()
        .map(|candidate| folder.join(candidate))
        .find(|candidate| candidate.exists())
}

/// Whether `file_name` is `name` or one of its lock files.
pub(super) fn concerns(file_name: &str, name: &str) -> bool {
    let short: String = name.chars().skip(2).collect();
    file_name == name
        || file_name == format!(".~lock.{name}#")
        || file_name == format!("~${name}")
        || (!short.is_empty() && file_name == format!("~${short}"))
}

/// The temporary file a write of `path` goes through.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.concord-tmp"))
}

/// Why a file was not replaced.
#[derive(Debug)]
pub(super) enum ReplaceError {
    /// The file no longer holds the bytes the new content was made from.
    Changed,
    /// Reading, writing or renaming failed.
    Io(std::io::Error),
}

impl From<std::io::Error> for ReplaceError {
    fn from(e: std::io::Error) -> ReplaceError {
        ReplaceError::Io(e)
    }
}

/// Replaces the file at `path`, which held `expected`, with `content`: written to a
/// temporary file in the same folder and synced, then renamed over the file if it
/// still holds `expected` (a program that saved meanwhile is not overwritten), and
/// the folder synced. Permissions of the file are kept.
pub(super) fn replace(path: &Path, expected: &[u8], content: &[u8]) -> Result<(), ReplaceError> {
    let temporary = temporary(path);
    let result = write_then_rename(path, &temporary, expected, content);
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

fn write_then_rename(
    path: &Path,
    temporary: &Path,
    expected: &[u8],
    content: &[u8],
) -> Result<(), ReplaceError> {
    let mut file = fs::File::create(temporary)?;
    file.write_all(content)?;
    file.sync_all()?;
    drop(file);
    if let Ok(metadata) = fs::metadata(path) {
        fs::set_permissions(temporary, metadata.permissions())?;
    }
    let now = match fs::read(path) {
        Ok(now) => now,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if now != expected {
        return Err(ReplaceError::Changed);
    }
    fs::rename(temporary, path)?;
    sync_folder(path)?;
    Ok(())
}

/// Makes a rename in the folder of `path` durable.
#[cfg(unix)]
fn sync_folder(path: &Path) -> std::io::Result<()> {
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::File::open(folder)?.sync_all()
}

#[cfg(not(unix))]
fn sync_folder(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Reads the file at `path`, refusing one larger than [`FILE_BYTES_MAX`].
pub(super) fn read(path: &Path, name: &str) -> Result<Vec<u8>, CsvError> {
    let io = |e: std::io::Error| CsvError::Io {
        file: name.to_owned(),
        source: e,
    };
    let len = fs::metadata(path).map_err(io)?.len();
    if len > FILE_BYTES_MAX {
        return Err(CsvError::TooLarge {
            file: name.to_owned(),
            len,
        });
    }
    fs::read(path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Sheet {
        Sheet::parse("t.csv", text.as_bytes().to_vec(), None)
            .expect("parses")
            .expect("has a header")
    }

    #[test]
    fn an_unchanged_file_is_written_back_verbatim() {
        for text in [
            "id,name\n1,Ada\n2,\"Bob, Jr.\"\n",
            "\u{feff}\"id\";\"name\"\r\n\"1\";\"Ada\"\r\n",
            "id|name\n1|Ada",
            "id\tname\n\n1\t\"multi\nline\"\n\n",
            "id,name\n",
            "id,name",
        ] {
            let sheet = parsed(text);
            let expected = text.replace("\n\n", "\n");
            assert_eq!(String::from_utf8_lossy(&sheet.to_bytes()), expected);
        }
    }

    #[test]
    fn the_format_is_read_from_the_header() {
        let sheet = parsed("\u{feff}\"a\";\"b\"\r\n1;2\r\n");
        assert_eq!(
            sheet.format,
            Format {
                delimiter: b';',
                bom: true,
                crlf: true,
                quote_all: true,
                final_break: true,
            }
        );
        assert_eq!(sheet.header, ["a", "b"]);
        assert!(!parsed("a,\"b\"\n").format.quote_all);
        assert_eq!(parsed("a\tb|c\tc\n").format.delimiter, b'\t');
    }

    #[test]
    fn a_changed_row_is_written_in_the_file_format() {
        let mut sheet = parsed("id|name\n1|Ada\n2|Bob");
        sheet.rows[0].set(1, "Ada | Lovelace".to_owned());
        let mut row = Row::new(2);
        row.set(0, "3".to_owned());
        sheet.rows.push(row);
        sheet.rows[1].deleted = true;
        assert_eq!(
            String::from_utf8_lossy(&sheet.to_bytes()),
            "id|name\n1|\"Ada | Lovelace\"\n3|"
        );
    }

    #[test]
    fn broken_files_name_their_line() {
        let error = |text: &str| {
            Sheet::parse("t.csv", text.as_bytes().to_vec(), None)
                .expect_err("does not parse")
                .to_string()
        };
        assert_eq!(
            error("id,name\n1,Ada\n2,\"Bo"),
            "t.csv: the quoted field opened on line 3 is not closed (the file may be half-written)"
        );
        assert_eq!(
            error("id,name\n1,Ada\n2\n"),
            "t.csv: line 3 has 1 fields, but the header has 2 (the file may be half-written)"
        );
        assert_eq!(
            Sheet::parse("t.csv", b"id\n1\n\xff\n".to_vec(), None)
                .expect_err("not UTF-8")
                .to_string(),
            "t.csv: byte 5 (line 3) is not UTF-8; CSV files are read as UTF-8 only"
        );
    }

    #[test]
    fn lock_files_of_spreadsheet_programs_are_recognized() {
        assert!(concerns(".~lock.customers.csv#", "customers.csv"));
        assert!(concerns("~$customers.csv", "customers.csv"));
        assert!(concerns("~$stomers.csv", "customers.csv"));
        assert!(!concerns(".customers.csv.concord-tmp", "customers.csv"));
    }
}
