//! The connector's HTTP client: one app, its auth, and the manners an API asks for.
//! A 429 pauses every request until its `Retry-After` has passed; a 5xx, a timeout
//! or a broken connection is retried with exponential backoff; requests run at most
//! [`Api::concurrency`] at a time. What still fails after that is an error the tool
//! loop retries later: nothing is dropped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Client, Method, StatusCode};
use tokio::runtime::Runtime;

use crate::values::shorten;

/// How long to wait after a 429 without a `Retry-After`.
const RETRY_AFTER_DEFAULT: Duration = Duration::from_secs(1);
/// Longest wait a `Retry-After` is honoured for at once.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
/// 429 answers one request takes before it gives up (and the loop retries later).
const RATE_LIMITED_ATTEMPTS_MAX: u32 = 30;
/// Attempts of a request that fails with a 5xx, a timeout or a broken connection.
const FAILED_ATTEMPTS_MAX: u32 = 5;
/// The first backoff after a failure; it doubles each time.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How requests authenticate.
#[derive(Clone, Default)]
pub enum Auth {
    /// No auth.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// Basic auth: user and password.
    Basic(String, String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        match self {
            Auth::None => f.write_str("None"),
            Auth::Bearer(_) => f.write_str("Bearer(..)"),
            Auth::Basic(user, _) => write!(f, "Basic({user}, ..)"),
        }
    }
}

/// Why a request failed after its retries.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The app could not be reached, timed out, or kept answering 5xx.
    #[error("{method} {url}: {message}")]
    Unreachable {
        /// The request's method.
        method: String,
        /// The address asked (without its query).
        url: String,
        /// What went wrong last.
        message: String,
    },
    /// The app kept answering 429.
    #[error("{method} {url}: still rate limited (429) after {attempts} attempts")]
    RateLimited {
        /// The request's method.
        method: String,
        /// The address asked (without its query).
        url: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The app refused the credentials (401 or 403).
    #[error("{method} {url}: the app refused the credentials ({status}){detail}")]
    Unauthorized {
        /// The request's method.
        method: String,
        /// The address asked (without its query).
        url: String,
        /// The status.
        status: u16,
        /// The app's message (`: ...`).
        detail: String,
    },
}

/// An answer: its status and its body as JSON (`Null` when empty or not JSON).
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) json: serde_json::Value,
    /// The body as text, shortened, when it is not JSON.
    pub(super) text: String,
}

impl Reply {
    /// The app's message in an error answer: `message` (or `error`) and the messages
    /// per field under `data` or `errors`, else the body's start.
    pub(super) fn message(&self) -> String {
        let mut out = format!("{}", self.status.as_u16());
        let top = ["message", "error", "detail"]
            .iter()
            .find_map(|k| self.json.get(*k).and_then(|m| m.as_str()));
        if let Some(top) = top {
            out.push_str(&format!(" {top}"));
        }
        for key in ["data", "errors"] {
            if let Some(fields) = self.json.get(key).and_then(|d| d.as_object()) {
                for (field, detail) in fields {
                    let text = detail
                        .get("message")
                        .and_then(|m| m.as_str())
                        .map_or_else(|| detail.to_string(), str::to_owned);
                    out.push_str(&format!("; {field}: {text}"));
                }
            }
        }
        if top.is_none() && !self.text.is_empty() {
            out.push_str(&format!(" {}", self.text));
        }
        out
    }
}

/// The client of one app.
pub(super) struct Api {
    /// `None` only while dropping.
    runtime: Option<Runtime>,
    client: Client,
    auth: Auth,
    /// No request starts before this instant (a 429's `Retry-After`).
    paused_until: Arc<Mutex<Instant>>,
    /// Requests in flight at most.
    pub(super) concurrency: usize,
}

impl Drop for Api {
    fn drop(&mut self) {
        // Without waiting: the connector may be dropped inside an async context.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("auth", &self.auth)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// A request, owned, so that several can run at once.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub(super) method: Method,
    pub(super) url: String,
    pub(super) body: Option<serde_json::Value>,
}

/// What one request needs of the client, cheap to clone into a task.
#[derive(Clone)]
pub(super) struct Sender {
    client: Client,
    auth: Auth,
    paused_until: Arc<Mutex<Instant>>,
}

impl Api {
    pub(super) fn new(auth: Auth, timeout: Duration, concurrency: usize) -> Result<Api, HttpError> {
        let failed = |message: String| HttpError::Unreachable {
            method: String::new(),
            url: String::new(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let client = Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| failed(e.to_string()))?;
        Ok(Api {
            runtime: Some(runtime),
            client,
            auth,
            paused_until: Arc::new(Mutex::new(Instant::now())),
            concurrency: concurrency.max(1),
        })
    }

    /// What a task needs to send requests.
    pub(super) fn sender(&self) -> Sender {
        Sender {
            client: self.client.clone(),
            auth: self.auth.clone(),
            paused_until: self.paused_until.clone(),
        }
    }

    /// Runs `future` to completion on the client's runtime.
    pub(super) fn block_on<F: Future>(&self, future: F) -> F::Output {
        match &self.runtime {
            Some(runtime) => runtime.block_on(future),
            None => unreachable!("the runtime is only taken when dropping"),
        }
    }

    /// Sends one request, with retries.
    pub(super) fn send(&self, request: Request) -> Result<Reply, HttpError> {
        let sender = self.sender();
        self.block_on(sender.send(request))
    }
}

impl Sender {
    /// Sends `request`, waiting out 429s and retrying failures (see the module docs).
    pub(super) async fn send(&self, request: Request) -> Result<Reply, HttpError> {
        let shown = request.url.split('?').next().unwrap_or_default().to_owned();
        let unreachable = |message: String| HttpError::Unreachable {
            method: request.method.to_string(),
            url: shown.clone(),
            message,
        };
        let mut limited = 0u32;
        let mut failed = 0u32;
        let mut backoff = BACKOFF_FIRST;
        loop {
            let until = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if until > now {
                tokio::time::sleep(until - now).await;
            }
            let mut builder = self
                .client
                .request(request.method.clone(), &request.url)
                .header(reqwest::header::ACCEPT, "application/json");
            builder = match &self.auth {
                Auth::None => builder,
                Auth::Bearer(token) => {
                    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                        .map_err(|_| unreachable("the token is not a valid header value".into()))?;
                    value.set_sensitive(true);
                    builder.header(AUTHORIZATION, value)
                }
                Auth::Basic(user, password) => builder.basic_auth(user, Some(password)),
            };
            if let Some(body) = &request.body {
                builder = builder
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.to_string());
            }
            let answer = builder.send().await;
            let response = match answer {
                Ok(response) => response,
                Err(e) => {
                    failed += 1;
                    if failed >= FAILED_ATTEMPTS_MAX {
                        return Err(unreachable(e.without_url().to_string()));
                    }
                    tracing::debug!(url = %shown, error = %e.without_url(), "request failed: retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                limited += 1;
                let wait = retry_after(response.headers().get(RETRY_AFTER));
                tracing::info!(url = %shown, wait_ms = wait.as_millis() as u64, "rate limited by the app (429): waiting");
                {
                    let mut until = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
                    *until = (*until).max(Instant::now() + wait);
                }
                if limited >= RATE_LIMITED_ATTEMPTS_MAX {
                    return Err(HttpError::RateLimited {
                        method: request.method.to_string(),
                        url: shown,
                        attempts: limited,
                    });
                }
                continue;
            }
            let bytes = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(e) => {
                    failed += 1;
                    if failed >= FAILED_ATTEMPTS_MAX {
                        return Err(unreachable(e.without_url().to_string()));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            let text = if json.is_null() {
                shorten(String::from_utf8_lossy(&bytes).trim())
            } else {
                String::new()
            };
            let reply = Reply { status, json, text };
            if status.is_server_error() {
                failed += 1;
                if failed >= FAILED_ATTEMPTS_MAX {
                    return Err(unreachable(format!("the app answered {}", reply.message())));
                }
                tracing::debug!(url = %shown, status = status.as_u16(), "the app failed: retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let message = reply.message();
                return Err(HttpError::Unauthorized {
                    method: request.method.to_string(),
                    url: shown,
                    status: status.as_u16(),
                    detail: format!(": {message}"),
                });
            }
            return Ok(reply);
        }
    }
}

/// The wait a `Retry-After` header asks for: seconds or an HTTP date, capped.
fn retry_after(header: Option<&HeaderValue>) -> Duration {
    let Some(text) = header.and_then(|h| h.to_str().ok()).map(str::trim) else {
        return RETRY_AFTER_DEFAULT;
    };
    let wait = if let Ok(seconds) = text.parse::<f64>() {
        Duration::try_from_secs_f64(seconds).unwrap_or(RETRY_AFTER_DEFAULT)
    } else if let Ok(date) = chrono::DateTime::parse_from_rfc2822(text) {
        let millis = date.timestamp_millis() - chrono::Utc::now().timestamp_millis();
        Duration::from_millis(millis.max(0) as u64)
    } else {
        RETRY_AFTER_DEFAULT
    };
    wait.min(RETRY_AFTER_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_caps_them() {
        let header = |s: &str| HeaderValue::from_str(s).expect("header");
        assert_eq!(retry_after(Some(&header("2"))), Duration::from_secs(2));
        assert_eq!(retry_after(Some(&header("86400"))), RETRY_AFTER_MAX);
        assert_eq!(retry_after(None), RETRY_AFTER_DEFAULT);
        assert_eq!(retry_after(Some(&header("soon"))), RETRY_AFTER_DEFAULT);
        let past = header("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(retry_after(Some(&past)), Duration::ZERO);
    }

    #[test]
    fn an_app_error_message_names_the_fields() {
        let reply = Reply {
            status: StatusCode::BAD_REQUEST,
            json: serde_json::json!({
                "message": "Failed to create record.",
                "data": {"email": {"code": "validation_is_email", "message": "Must be a valid email address."}}
            }),
            text: String::new(),
        };
        assert_eq!(
            reply.message(),
            "400 Failed to create record.; email: Must be a valid email address."
        );
    }
}
