//! Spreadsheets: a CSV file kept in two-way sync with a SQLite database by two
//! agents over real QUIC. The file keeps its format (BOM, `;`, CRLF, a column
//! Concord does not map); rows added, edited and deleted on either side travel; a
//! file replaced wholesale by an export is read as the changes it holds; a file
//! locked by a spreadsheet program is not written until it is free, and an edit
//! made to it meanwhile is kept; a malformed value is a dead letter; a renamed
//! column is a clear error.

use std::path::{Path, PathBuf};

use anyhow::Context;
use concord_tests::{Node, Row, admin, eventually, free_udp_addr};

/// The sheet agent's tool: `sheets/customers.csv`, keyed by `id`.
const SHEET_TOOL: &str = "[[tool]]\nname = \"sheet\"\nkind = \"csv\"\npath = \"sheets\"\n\
    debounce_ms = 100\npoll_interval_ms = 1000\n\n\
    [[tool.collection]]\nname = \"customers\"\nfile = \"customers.csv\"\nprimary_key = \"id\"\n\
    columns = [\"name\", \"email\", \"city\", \"age\"]\ntypes = { age = \"integer\" }\n";

/// The file as a spreadsheet program exported it: BOM, `;`, CRLF, and a `notes`
/// column only people read.
const START: &str = "\u{feff}id;name;email;city;age;notes\r\n\
                     1;Ada;ada@example.com;London;36;\"likes; semicolons\"\r\n";

struct Pair {
    office: Node,
    sheet: Node,
    file: PathBuf,
}

fn pair(root: &Path, start: &str) -> anyhow::Result<Pair> {
    let mut office = Node::new(root, "office")?;
    let mut sheet = Node::new(root, "sheet")?;
    let folder = sheet.files.dir.join("sheets");
    std::fs::create_dir_all(&folder)?;
    let file = folder.join("customers.csv");
    std::fs::write(&file, start)?;
    let (addr_o, addr_s) = (free_udp_addr()?, free_udp_addr()?);
    office.configure(&addr_o, &[(sheet.id(), Some(addr_s.clone()))])?;
    sheet.configure_with(&addr_s, &[(office.id(), Some(addr_o))], SHEET_TOOL)?;
    Ok(Pair {
        office,
        sheet,
        file,
    })
}

/// The file's rows as office rows, ordered by id (`;` or `,` as its header has).
fn sheet_rows(file: &Path) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(file)?;
    let header = text.lines().next().unwrap_or_default();
    let delimiter = if header.contains(';') { b';' } else { b',' };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_reader(text.trim_start_matches('\u{feff}').as_bytes());
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record?;
        let cell = |i: usize| record.get(i).filter(|c| !c.is_empty()).map(str::to_owned);
        rows.push((
            cell(0).context("id")?.parse()?,
            cell(1),
            cell(2),
            cell(3),
            cell(4).map(|a| a.parse()).transpose()?,
        ));
    }
    rows.sort();
    Ok(rows)
}

/// Waits until the database and the file hold the same rows, `count` of them.
async fn agree(pair: &Pair, count: usize, what: &str) -> anyhow::Result<Vec<Row>> {
    eventually(what, async || {
        let (db, sheet) = (pair.office.rows()?, sheet_rows(&pair.file)?);
        Ok((db == sheet && db.len() == count).then_some(db))
    })
    .await
}

fn row(id: i64, name: &str, email: &str, city: &str, age: i64) -> Row {
    (
        id,
        Some(name.to_owned()),
        Some(email.to_owned()),
        Some(city.to_owned()),
        Some(age),
    )
}

/// Waits until the database holds `expected` among its rows.
async fn db_holds(pair: &Pair, expected: Row, what: &str) -> anyhow::Result<()> {
    eventually(what, async || {
        Ok(pair.office.rows()?.contains(&expected).then_some(()))
    })
    .await
}

/// Another program rewrites the file in place.
fn edit(file: &Path, from: &str, to: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)?;
    anyhow::ensure!(text.contains(from), "`{from}` in {text:?}");
    std::fs::write(file, text.replacen(from, to, 1))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_and_a_csv_file_sync_both_ways_keeping_the_files_format() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let pair = pair(root.path(), START)?;
    let (_office, _sheet) = (pair.office.start().await?, pair.sheet.start().await?);
    agree(&pair, 1, "Ada in the database").await?;

    // A row inserted in the database is appended to the file, in its format.
    pair.office.db()?.execute(
        "INSERT INTO customers (id, name, email, city, age) VALUES (2, 'Grace', 'grace@example.com', 'New York', 45)",
        [],
    )?;
    pair.office
        .db()?
        .execute("UPDATE customers SET city = 'Paris' WHERE id = 1", [])?;
    agree(&pair, 2, "Grace in the file").await?;
    eventually("Ada's move in the file", async || {
        Ok(sheet_rows(&pair.file)?
            .contains(&row(1, "Ada", "ada@example.com", "Paris", 36))
            .then_some(()))
    })
    .await?;
    let text = std::fs::read_to_string(&pair.file)?;
    assert_eq!(
        text,
        "\u{feff}id;name;email;city;age;notes\r\n\
         1;Ada;ada@example.com;Paris;36;\"likes; semicolons\"\r\n\
         2;Grace;grace@example.com;New York;45;\r\n",
        "BOM, delimiter, quoting, line endings and the notes column kept"
    );

    // Edits and deletes made in the file reach the database.
    edit(&pair.file, "New York;45", "New York;46")?;
    db_holds(
        &pair,
        row(2, "Grace", "grace@example.com", "New York", 46),
        "Grace's birthday in the database",
    )
    .await?;
    pair.office
        .db()?
        .execute("DELETE FROM customers WHERE id = 1", [])?;
    agree(&pair, 1, "Ada deleted from the file").await?;
    assert!(
        !std::fs::read_to_string(&pair.file)?.contains("semicolons"),
        "the deleted row's unmapped cells went with it"
    );
    edit(
        &pair.file,
        "2;Grace;grace@example.com;New York;46;\r\n",
        "2;Grace;grace@example.com;New York;46;\r\n3;Linus;linus@example.com;Helsinki;50;\r\n",
    )?;
    agree(&pair, 2, "Linus in the database").await?;
    edit(&pair.file, "2;Grace;grace@example.com;New York;46;\r\n", "")?;
    agree(&pair, 1, "Grace deleted from the database").await?;

    // The file replaced wholesale by an export (a new file renamed over it): rows
    // in another order, one changed, one new.
    let export = pair.file.with_file_name("export.tmp");
    std::fs::write(
        &export,
        "\u{feff}id;name;email;city;age;notes\r\n\
         7;Margaret;margaret@example.com;Boston;60;\r\n\
         3;Linus;linus@example.com;Portland;50;moved\r\n",
    )?;
    std::fs::rename(&export, &pair.file)?;
    let rows = agree(&pair, 2, "the export in the database").await?;
    assert_eq!(
        rows,
        [
            row(3, "Linus", "linus@example.com", "Portland", 50),
            row(7, "Margaret", "margaret@example.com", "Boston", 60)
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_file_waits_and_an_edit_made_meanwhile_is_kept() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let start = "id,name,email,city,age\n1,Ada,ada@example.com,London,36\n\
                 2,Grace,grace@example.com,New York,45\n";
    let pair = pair(root.path(), start)?;
    let (_office, _sheet) = (pair.office.start().await?, pair.sheet.start().await?);
    eventually("both rows in the database", async || {
        Ok((pair.office.rows()?.len() == 2).then_some(()))
    })
    .await?;

    // A spreadsheet program opens the file: it holds a lock file beside it.
    let lock = pair.file.with_file_name(".~lock.customers.csv#");
    std::fs::write(&lock, "someone,host,2026-11-24\n")?;
    pair.office
        .db()?
        .execute("UPDATE customers SET city = 'Paris' WHERE id = 1", [])?;
    // The write-back is due and refused while the lock is there.
    let client = reqwest::Client::new();
    let health = format!("{}/healthz", pair.sheet.admin_url()?);
    eventually("the sheet tool reporting the lock", async || {
        let body = client.get(&health).send().await?.text().await?;
        Ok(body.contains("locked").then_some(body))
    })
    .await?;
    assert!(std::fs::read_to_string(&pair.file)?.contains("1,Ada,ada@example.com,London,36"));

    // Meanwhile the person edits another row and saves.
    edit(&pair.file, "New York,45", "New York,46")?;
    db_holds(
        &pair,
        row(2, "Grace", "grace@example.com", "New York", 46),
        "Grace's edit in the database",
    )
    .await?;

    // The program closes the file: the write-back lands, and the edit is kept.
    std::fs::remove_file(&lock)?;
    let rows = agree(&pair, 2, "both edits in both").await?;
    assert_eq!(
        rows,
        [
            row(1, "Ada", "ada@example.com", "Paris", 36),
            row(2, "Grace", "grace@example.com", "New York", 46)
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_value_is_a_dead_letter_and_a_renamed_column_a_clear_error()
-> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let start = "id,name,email,city,age\n1,Ada,ada@example.com,London,36\n\
                 2,Grace,grace@example.com,New York,forty-five\n";
    let pair = pair(root.path(), start)?;
    let (_office, sheet) = (pair.office.start().await?, pair.sheet.start().await?);

    // Ada syncs; Grace's age is no integer: a dead letter naming the column.
    let client = admin(&pair.sheet)?;
    let letter = eventually("Grace's dead letter", async || {
        Ok(client.dead_letters().await?.into_iter().next())
    })
    .await?;
    assert_eq!(letter.kind, "invalid_row");
    assert_eq!(letter.key, "2");
    assert!(letter.reason.contains("`age`"), "{}", letter.reason);
    assert!(letter.reason.contains("forty-five"), "{}", letter.reason);
    eventually("Ada in the database", async || {
        Ok((pair.office.rows()? == [row(1, "Ada", "ada@example.com", "London", 36)]).then_some(()))
    })
    .await?;
    // Fixed in the file, the row syncs and the letter clears.
    edit(&pair.file, "forty-five", "45")?;
    agree(&pair, 2, "Grace in the database").await?;
    eventually("the letter cleared", async || {
        Ok(client.dead_letters().await?.is_empty().then_some(()))
    })
    .await?;

    // A column renamed in the file: the tool reports it, and writes nothing.
    edit(&pair.file, "id,name,email,", "id,name,mail,")?;
    pair.office
        .db()?
        .execute("UPDATE customers SET city = 'Paris' WHERE id = 1", [])?;
    let http = reqwest::Client::new();
    let health = format!("{}/healthz", pair.sheet.admin_url()?);
    let body = eventually("the renamed column reported", async || {
        let body = http.get(&health).send().await?.text().await?;
        Ok(body.contains("no column `email`").then_some(body))
    })
    .await?;
    assert!(body.contains("customers.csv"), "{body}");
    assert!(std::fs::read_to_string(&pair.file)?.contains("1,Ada,ada@example.com,London,36"));

    // Started on such a file, an agent refuses with the same words.
    sheet.shutdown().await;
    let error = pair.sheet.start().await.expect_err("a renamed column");
    let message = format!("{error:#}");
    assert!(
        message.contains("no column `email` in the header (columns: id, name, mail, city, age)"),
        "{message}"
    );
    Ok(())
}
