//! A real headless Chromium, driven over WebDriver (Debian's `chromium` and
//! `chromedriver`), for tests of the dashboard.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where Debian installs the browser and its driver.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// See [`CHROMIUM`].
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long the driver may take to be ready.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long opening the browser may take.
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);

/// A chromedriver process and a browser session on it. Close it with
/// [`Browser::close`]; dropping it kills the driver and every browser it started.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    /// The WebDriver session.
    pub client: fantoccini::Client,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a headless Chromium.
    /// Fails, naming the packages, when they are not installed.
    pub async fn start() -> anyhow::Result<Browser> {
        for path in [CHROMIUM, CHROMEDRIVER] {
            anyhow::ensure!(
                std::path::Path::new(path).exists(),
                "{path} is missing: install Debian's `chromium` and `chromium-driver` packages"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // Its own process group, so that the browsers it starts go with it.
        let driver = {
            use std::os::unix::process::CommandExt;
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .context("starting chromedriver")?
        };
        // Dropped on failure: the driver is killed.
        let browser = Browser {
            driver,
            client: connect(port).await?,
        };
        browser
            .client
            .set_window_size(1280, 900)
            .await
            .context("sizing the window")?;
        Ok(browser)
    }

    /// Ends the browser session and the driver.
    pub async fn close(self) -> anyhow::Result<()> {
        self.client.clone().close().await?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // `--` before the group: without it `kill` reads `-PGID` as an option.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--"])
            .arg(format!("-{}", self.driver.id()))
            .status();
        let _ = self.driver.wait();
    }
}

/// Waits for the driver on `port` to be ready, and opens a headless session.
async fn connect(port: u16) -> anyhow::Result<fantoccini::Client> {
    let status = format!("http://127.0.0.1:{port}/status");
    let deadline = Instant::now() + DRIVER_READY_TIMEOUT;
    loop {
        let ready = match reqwest::get(&status).await {
            Ok(answer) => answer
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|v| v["value"]["ready"] == true),
            Err(_) => false,
        };
        if ready {
            break;
        }
        if Instant::now() > deadline {
            bail!("chromedriver was not ready within {DRIVER_READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let mut builder = fantoccini::ClientBuilder::new(connector);
    builder.capabilities(capabilities);
    let url = format!("http://127.0.0.1:{port}");
    let session = builder.connect(&url);
    let client = tokio::time::timeout(SESSION_TIMEOUT, session)
        .await
        .with_context(|| format!("no Chromium session within {SESSION_TIMEOUT:?}"))?
        .context("opening a Chromium session")?;
    Ok(client)
}
