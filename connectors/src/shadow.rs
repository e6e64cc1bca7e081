//! What a connector last captured of each record, for tools that cannot say what
//! changed (a CSV file, a REST API read by an updated-since filter): the connector
//! diffs what the tool holds now against it.
//!
//! Captures are *staged*: a capture's view of its records is kept in memory, and
//! becomes durable only when the agent acknowledges the capture's sequence number
//! (the agent stored the batch). After a crash the connector diffs against the
//! last acknowledged view, so what was captured and not stored is captured again.
//! What the connector itself wrote is durable at once ([`Shadow::written`]): the
//! tool holds it, and the agent recorded the write.
//!
//! Kept in a small SQLite file per tool, beside the agent's store, with the store
//! that captured the tool (see [`crate::Connector::claim`]).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use rusqlite::{OptionalExtension, params};

/// A record's stored form: the connector's own text (JSON), `None` when the record
/// is gone.
pub(crate) type Body = Option<String>;

/// What one capture saw: each record's collection, key and body.
pub(crate) type Seen = Vec<(String, String, Body)>;

/// The staged shadow of one tool.
#[derive(Debug)]
pub(crate) struct Shadow {
    db: rusqlite::Connection,
    path: PathBuf,
    /// Captures not acknowledged yet, in order: sequence and the records they saw.
    pending: VecDeque<(u64, Seen)>,
    /// The latest pending body of each record in `pending`.
    overlay: HashMap<(String, String), Body>,
    /// The last sequence number given out.
    seq: u64,
}

/// The shadow file failed.
#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {message}")]
pub(crate) struct ShadowError {
    /// The file.
    pub(crate) path: String,
    /// What went wrong.
    pub(crate) message: String,
}

impl Shadow {
    /// Opens (or creates) the shadow file at `path`.
    pub(crate) fn open(path: &Path) -> Result<Shadow, ShadowError> {
        let error = |e: &dyn std::fmt::Display| ShadowError {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| error(&e))?;
        }
        let db = rusqlite::Connection::open(path).map_err(|e| error(&e))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS records (
                 collection TEXT NOT NULL,
                 key TEXT NOT NULL,
                 body TEXT NOT NULL,
                 PRIMARY KEY (collection, key)
             );
             CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .map_err(|e| error(&e))?;
        let seq = db
            .query_row("SELECT value FROM meta WHERE name = 'seq'", [], |row| {
                row.get::<_, String>(0)
            })
            .optional()
            .map_err(|e| error(&e))?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok(Shadow {
            db,
            path: path.to_owned(),
            pending: VecDeque::new(),
            overlay: HashMap::new(),
            seq,
        })
    }

    fn error(&self, e: rusqlite::Error) -> ShadowError {
        ShadowError {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// The record's body as last captured or written; `None` if unknown or gone.
    pub(crate) fn get(&self, collection: &str, key: &str) -> Result<Body, ShadowError> {
        if let Some(body) = self.overlay.get(&(collection.to_owned(), key.to_owned())) {
            return Ok(body.clone());
        }
        self.db
            .query_row(
                "SELECT body FROM records WHERE collection = ?1 AND key = ?2",
                params![collection, key],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.error(e))
    }

    /// The keys of the records of `collection` present as last captured or written.
    pub(crate) fn keys(&self, collection: &str) -> Result<Vec<String>, ShadowError> {
        let mut statement = self
            .db
            .prepare_cached("SELECT key FROM records WHERE collection = ?1")
            .map_err(|e| self.error(e))?;
        let mut keys: Vec<String> = statement
            .query_map(params![collection], |row| row.get(0))
            .and_then(Iterator::collect)
            .map_err(|e| self.error(e))?;
        drop(statement);
        keys.retain(|k| {
            self.overlay
                .get(&(collection.to_owned(), k.clone()))
                .is_none_or(Option::is_some)
        });
        for ((c, k), body) in &self.overlay {
            if c == collection && body.is_some() && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        Ok(keys)
    }

    /// The sequence number a capture after `after` gets: past every one given out
    /// and past `after` (the agent's durable cursor, which survives this file).
    pub(crate) fn next_seq(&mut self, after: u64) -> u64 {
        self.seq = self.seq.max(after) + 1;
        self.seq
    }

    /// Stages what capture `seq` saw (records and bodies, `None` for gone): later
    /// reads see it, and it becomes durable when `seq` is acknowledged.
    pub(crate) fn stage(&mut self, seq: u64, seen: Seen) {
        for (collection, key, body) in &seen {
            self.overlay
                .insert((collection.clone(), key.clone()), body.clone());
        }
        self.pending.push_back((seq, seen));
    }

    /// Every capture up to `seq` is stored by the agent: its view becomes durable.
    pub(crate) fn acknowledge(&mut self, seq: u64) -> Result<(), ShadowError> {
        let mut done = Vec::new();
        while self.pending.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, seen)) = self.pending.pop_front() {
                done.extend(seen);
            }
        }
        let acknowledged = seq.max(self.acknowledged_seq());
        let path = self.path.display().to_string();
        let error = |e: rusqlite::Error| ShadowError {
            path: path.clone(),
            message: e.to_string(),
        };
        let tx = self.db.transaction().map_err(error)?;
        for (collection, key, body) in &done {
            put(&tx, collection, key, body.as_deref()).map_err(error)?;
        }
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('seq', ?1)
             ON CONFLICT (name) DO UPDATE SET value = ?1",
            params![acknowledged.to_string()],
        )
        .map_err(error)?;
        tx.commit().map_err(error)?;
        self.rebuild_overlay();
        Ok(())
    }

    fn acknowledged_seq(&self) -> u64 {
        self.db
            .query_row("SELECT value FROM meta WHERE name = 'seq'", [], |row| {
                row.get::<_, String>(0)
            })
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The connector wrote each of `writes` (collection, key, body; `None`: deleted
    /// it) and learned each of `meta` (name, value): durable at once, in one
    /// commit, and no pending capture's older view of a written record will
    /// overwrite it.
    pub(crate) fn written(
        &mut self,
        writes: &[(String, String, Body)],
        meta: &[(String, String)],
    ) -> Result<(), ShadowError> {
        if writes.is_empty() && meta.is_empty() {
            return Ok(());
        }
        let path = self.path.display().to_string();
        let error = |e: rusqlite::Error| ShadowError {
            path: path.clone(),
            message: e.to_string(),
        };
        let tx = self.db.transaction().map_err(error)?;
        for (collection, key, body) in writes {
            put(&tx, collection, key, body.as_deref()).map_err(error)?;
        }
        for (name, value) in meta {
            tx.execute(
                "INSERT INTO meta (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = ?2",
                params![name, value],
            )
            .map_err(error)?;
        }
        tx.commit().map_err(error)?;
        let written: std::collections::HashSet<(&str, &str)> = writes
            .iter()
            .map(|(c, k, _)| (c.as_str(), k.as_str()))
            .collect();
        for (_, seen) in &mut self.pending {
            seen.retain(|(c, k, _)| !written.contains(&(c.as_str(), k.as_str())));
        }
        for (collection, key, _) in writes {
            self.overlay.remove(&(collection.clone(), key.clone()));
        }
        Ok(())
    }

    fn rebuild_overlay(&mut self) {
        self.overlay.clear();
        for (_, seen) in &self.pending {
            for (collection, key, body) in seen {
                self.overlay
                    .insert((collection.clone(), key.clone()), body.clone());
            }
        }
    }

    /// Records `store` as the store capturing the tool. Returns true when another
    /// store captured it before: the shadow is cleared, so everything is captured
    /// again (a rescan).
    pub(crate) fn claim(&mut self, store: &[u8]) -> Result<bool, ShadowError> {
        let store = hex(store);
        let store = store.as_str();
        let claimed: Option<String> = self
            .db
            .query_row("SELECT value FROM meta WHERE name = 'store'", [], |row| {
                row.get(0)
            })
            .optional()
            .map_err(|e| self.error(e))?;
        if claimed.as_deref() == Some(store) {
            return Ok(false);
        }
        let rescan = claimed.is_some();
        if rescan {
            self.db
                .execute("DELETE FROM records", [])
                .map_err(|e| self.error(e))?;
            self.pending.clear();
            self.overlay.clear();
        }
        self.db
            .execute(
                "INSERT INTO meta (name, value) VALUES ('store', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = ?1",
                params![store],
            )
            .map_err(|e| self.error(e))?;
        Ok(rescan)
    }

    /// A value of the connector's own under `name` (a token's key, a watermark).
    pub(crate) fn meta(&self, name: &str) -> Result<Option<String>, ShadowError> {
        self.db
            .query_row(
                "SELECT value FROM meta WHERE name = ?1",
                params![name],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.error(e))
    }
}

fn put(
    db: &rusqlite::Connection,
    collection: &str,
    key: &str,
    body: Option<&str>,
) -> Result<(), rusqlite::Error> {
    match body {
        Some(body) => db.execute(
            "INSERT INTO records (collection, key, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (collection, key) DO UPDATE SET body = ?3",
            params![collection, key, body],
        ),
        None => db.execute(
            "DELETE FROM records WHERE collection = ?1 AND key = ?2",
            params![collection, key],
        ),
    }
    .map(drop)
}

/// The hex form of a store id, as the connectors' state files record it.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(key: &str, body: Option<&str>) -> Vec<(String, String, Body)> {
        vec![("c".to_owned(), key.to_owned(), body.map(str::to_owned))]
    }

    #[test]
    fn a_capture_is_durable_only_once_acknowledged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.shadow");
        let mut shadow = Shadow::open(&path).expect("open");
        let one = shadow.next_seq(0);
        shadow.stage(one, seen("a", Some("1")));
        let two = shadow.next_seq(0);
        shadow.stage(two, seen("b", Some("2")));
        assert_eq!(shadow.get("c", "a").expect("get"), Some("1".to_owned()));
        shadow.acknowledge(one).expect("ack");
        drop(shadow);
        // Reopened as after a crash: only the acknowledged capture is there.
        let mut shadow = Shadow::open(&path).expect("reopen");
        assert_eq!(shadow.get("c", "a").expect("get"), Some("1".to_owned()));
        assert_eq!(shadow.get("c", "b").expect("get"), None);
        assert_eq!(
            shadow.next_seq(0),
            two,
            "sequence numbers go on after the acknowledged one"
        );
    }

    #[test]
    fn a_write_is_not_overwritten_by_an_older_pending_capture() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut shadow = Shadow::open(&dir.path().join("t.shadow")).expect("open");
        let one = shadow.next_seq(0);
        shadow.stage(one, seen("a", Some("old")));
        shadow
            .written(&[("c".into(), "a".into(), Some("new".into()))], &[])
            .expect("write");
        shadow.acknowledge(one).expect("ack");
        assert_eq!(shadow.get("c", "a").expect("get"), Some("new".to_owned()));
        assert_eq!(shadow.keys("c").expect("keys"), ["a"]);
        shadow
            .written(&[("c".into(), "a".into(), None)], &[])
            .expect("delete");
        assert!(shadow.keys("c").expect("keys").is_empty());
    }
}
