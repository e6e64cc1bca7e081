//! A real CalDAV server for the tests: Radicale, started in a folder of its own on a
//! free loopback port with htpasswd auth, and a small client that plays a user's
//! calendar app against it.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use connectors::caldav::event;
use crdt_model::Record;
use reqwest::{Client, Method, StatusCode};

/// The user every server has.
pub const USER: &str = "ada";
/// Her password.
pub const PASSWORD: &str = "secret";

/// How long a server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running Radicale server; stopped when dropped.
#[derive(Debug)]
pub struct Radicale {
    child: Child,
    /// `http://127.0.0.1:port/`.
    pub url: String,
    /// Its folder.
    pub dir: PathBuf,
    client: Client,
}

impl Drop for Radicale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `radicale` program: `CONCORD_RADICALE`, the workspace's `.venv` (where the CI
/// script installs it), or the `PATH`.
fn radicale_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("CONCORD_RADICALE") {
        return Ok(PathBuf::from(path));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/radicale");
    if venv.exists() {
        return Ok(venv);
    }
    let found = Command::new("sh")
        .args(["-c", "command -v radicale"])
        .output()
        .context("looking for radicale")?;
    if found.status.success() {
        return Ok(PathBuf::from(String::from_utf8_lossy(&found.stdout).trim()));
    }
    bail!(
        "Radicale is not installed: run `python3 -m venv .venv && .venv/bin/pip install radicale` \
         in the workspace (the CI script does), or set CONCORD_RADICALE"
    )
}

impl Radicale {
    /// Starts a server in `root/name` with one calendar per name in `calendars`.
    pub async fn start(root: &Path, name: &str, calendars: &[&str]) -> anyhow::Result<Radicale> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("users"), format!("{USER}:{PASSWORD}\n"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = format!(
            "[server]\nhosts = 127.0.0.1:{port}\n\n[auth]\ntype = htpasswd\n\
             htpasswd_filename = {users}\nhtpasswd_encryption = plain\n\n\
             [rights]\ntype = owner_only\n\n[storage]\nfilesystem_folder = {storage}\n\n\
             [logging]\nlevel = warning\n",
            users = dir.join("users").display(),
            storage = dir.join("collections").display(),
        );
        std::fs::write(dir.join("config"), config)?;
        let log = std::fs::File::create(dir.join("radicale.log"))?;
        let child = Command::new(radicale_bin()?)
            .arg("--config")
            .arg(dir.join("config"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting radicale")?;
        let server = Radicale {
            child,
            url: format!("http://127.0.0.1:{port}/"),
            dir,
            client: Client::builder().timeout(Duration::from_secs(30)).build()?,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(response) = server.request(Method::GET, "", None, &[]).await
                && response.0.is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(server.dir.join("radicale.log"))?;
                bail!("radicale did not start within {START_TIMEOUT:?}: {log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for calendar in calendars {
            server.make_calendar(calendar).await?;
        }
        Ok(server)
    }

    /// Creates calendar `name` of the user.
    pub async fn make_calendar(&self, name: &str) -> anyhow::Result<()> {
        let method = Method::from_bytes(b"MKCALENDAR")?;
        let (status, _, body) = self
            .request(method, &format!("{USER}/{name}/"), None, &[])
            .await?;
        if status != StatusCode::CREATED {
            bail!("MKCALENDAR {name}: {status} {body}");
        }
        Ok(())
    }

    /// A `[[tool]]` of kind caldav for this server syncing `calendar` as collection
    /// `events`, polled every 100 ms.
    pub fn tool(&self, name: &str, calendar: &str) -> String {
        format!(
            "[[tool]]\nname = \"{name}\"\nkind = \"caldav\"\nurl = \"{url}\"\nuser = \"{USER}\"\n\
             password = \"{PASSWORD}\"\npoll_interval_ms = 100\n\n\
             [[tool.collection]]\nname = \"events\"\ncalendar = \"{calendar}\"\n\n",
            url = self.url
        )
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(StatusCode, Option<String>, String)> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.url))
            .basic_auth(USER, Some(PASSWORD));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await?;
        let status = response.status();
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((status, etag, response.text().await?))
    }

    /// Writes event `uid` into `calendar` as a calendar app would (no condition);
    /// returns its new ETag.
    pub async fn put(&self, calendar: &str, uid: &str, ics: &str) -> anyhow::Result<String> {
        let (status, etag, body) = self
            .request(
                Method::PUT,
                &format!("{USER}/{calendar}/{uid}.ics"),
                Some(ics.to_owned()),
                &[("content-type", "text/calendar")],
            )
            .await?;
        if !status.is_success() {
            bail!("PUT {uid}: {status} {body}");
        }
        etag.context("an ETag")
    }

    /// Writes resource `href` as a calendar app would (no condition).
    pub async fn put_href(&self, href: &str, ics: &str) -> anyhow::Result<String> {
        let (status, etag, body) = self
            .request(
                Method::PUT,
                href.trim_start_matches('/'),
                Some(ics.to_owned()),
                &[("content-type", "text/calendar")],
            )
            .await?;
        if !status.is_success() {
            bail!("PUT {href}: {status} {body}");
        }
        etag.context("an ETag")
    }

    /// Deletes event `uid` from `calendar` as a calendar app would.
    pub async fn delete(&self, calendar: &str, uid: &str) -> anyhow::Result<()> {
        let (status, _, body) = self
            .request(
                Method::DELETE,
                &format!("{USER}/{calendar}/{uid}.ics"),
                None,
                &[],
            )
            .await?;
        if !status.is_success() {
            bail!("DELETE {uid}: {status} {body}");
        }
        Ok(())
    }

    /// The hrefs in `calendar` and their ETags.
    pub async fn hrefs(&self, calendar: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let body = "<?xml version=\"1.0\"?><D:propfind xmlns:D=\"DAV:\"><D:prop><D:getetag/>\
                    </D:prop></D:propfind>";
        let (status, _, text) = self
            .request(
                Method::from_bytes(b"PROPFIND")?,
                &format!("{USER}/{calendar}/"),
                Some(body.to_owned()),
                &[("depth", "1"), ("content-type", "application/xml")],
            )
            .await?;
        if status != StatusCode::MULTI_STATUS {
            bail!("PROPFIND {calendar}: {status} {text}");
        }
        let mut hrefs = BTreeMap::new();
        for response in text.split("<response>").skip(1) {
            let href = between(response, "<href>", "</href>");
            let etag = between(response, "<getetag>", "</getetag>");
            if let (Some(href), Some(etag)) = (href, etag)
                && href.ends_with(".ics")
            {
                hrefs.insert(href.to_owned(), etag.replace("&quot;", "\""));
            }
        }
        Ok(hrefs)
    }

    /// The raw text of resource `href`.
    pub async fn get_href(&self, href: &str) -> anyhow::Result<String> {
        let path = href.trim_start_matches('/');
        let (status, _, body) = self.request(Method::GET, path, None, &[]).await?;
        if !status.is_success() {
            bail!("GET {href}: {status}");
        }
        Ok(body)
    }

    /// The raw text of event `uid`, if it is stored under `uid.ics`.
    pub async fn get(&self, calendar: &str, uid: &str) -> anyhow::Result<Option<String>> {
        let (status, _, body) = self
            .request(
                Method::GET,
                &format!("{USER}/{calendar}/{uid}.ics"),
                None,
                &[],
            )
            .await?;
        Ok(status.is_success().then_some(body))
    }

    /// Every event of `calendar` read as Concord reads it, by UID.
    pub async fn events(&self, calendar: &str) -> anyhow::Result<BTreeMap<String, Record>> {
        let mut events = BTreeMap::new();
        for href in self.hrefs(calendar).await?.keys() {
            let path = href.trim_start_matches('/');
            let (status, _, text) = self.request(Method::GET, path, None, &[]).await?;
            if status == StatusCode::NOT_FOUND {
                // Deleted between the listing and the read.
                continue;
            }
            if !status.is_success() {
                bail!("GET {href}: {status}");
            }
            let (uid, record) = event::read(&text).map_err(|e| anyhow::anyhow!("{href}: {e:?}"))?;
            if events.insert(uid.clone(), record).is_some() {
                bail!("event {uid} is in {calendar} twice");
            }
        }
        Ok(events)
    }
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}
