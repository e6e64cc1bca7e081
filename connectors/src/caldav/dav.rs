//! The WebDAV and CalDAV requests the connector makes: discovery, RFC 6578
//! `sync-collection`, `calendar-multiget`, and conditional `PUT` and `DELETE`.

use std::time::Duration;

use quick_xml::Reader;
use quick_xml::events::Event;
use reqwest::header::{CONTENT_TYPE, ETAG, HeaderValue, IF_MATCH, IF_NONE_MATCH};
use reqwest::{Client, Method, StatusCode};
use tokio::runtime::Runtime;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Resources fetched per `calendar-multiget`.
pub(super) const MULTIGET_MAX: usize = 100;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum DavError {
    /// The server could not be reached, or the connection broke.
    #[error("{url}: {message}")]
    Unreachable {
        /// The address asked.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The server answered with an unexpected status.
    #[error("{method} {url}: the server answered {status}{detail}")]
    Status {
        /// The request's method.
        method: String,
        /// The address asked.
        url: String,
        /// The status.
        status: u16,
        /// The start of the answer's body, if any (`: ...`).
        detail: String,
    },
    /// The answer is not the XML expected.
    #[error("{url}: the server's answer cannot be read: {message}")]
    Malformed {
        /// The address asked.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The server no longer knows the sync token (RFC 6578 `valid-sync-token`).
    #[error("the server rejected the sync token")]
    TokenRejected,
}

/// A WebDAV client of one server account.
pub(super) struct Dav {
    /// `None` only while dropping.
    runtime: Option<Runtime>,
    client: Client,
    user: Option<(String, String)>,
}

impl Drop for Dav {
    fn drop(&mut self) {
        // Without waiting: the connector may be dropped inside an async context.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Dav {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Dav")
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// One member of a collection in a multistatus answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Member {
    pub(super) href: String,
    /// The member's ETag; `None` when the member is gone (404).
    pub(super) etag: Option<String>,
    /// The resource's body, when asked for (`calendar-data`).
    pub(super) body: Option<String>,
    /// The resource is a collection (discovery).
    pub(super) collection: bool,
    /// `current-user-principal` or `calendar-home-set`, when asked for.
    pub(super) link: Option<String>,
}

/// What one `sync-collection` report returned.
#[derive(Debug, Default)]
pub(super) struct SyncReport {
    pub(super) token: String,
    pub(super) members: Vec<Member>,
    /// The server cut the answer short (507 on the collection): ask again from
    /// `token` for the rest.
    pub(super) truncated: bool,
}

/// What a conditional write did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Written {
    /// Written; the new ETag, if the server said.
    Done(Option<String>),
    /// The condition failed (412): the resource changed, or exists, or is gone.
    Precondition,
    /// The server refused the body (4xx other than 412): its status and message.
    Refused(u16, String),
}

impl Dav {
    pub(super) fn new(user: Option<(String, String)>) -> Result<Dav, DavError> {
        let unreachable = |e: std::io::Error| DavError::Unreachable {
            url: String::new(),
            message: e.to_string(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(unreachable)?;
        let client = Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| DavError::Unreachable {
                url: String::new(),
                message: e.to_string(),
            })?;
        Ok(Dav {
            runtime: Some(runtime),
            client,
            user,
        })
    }

    fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<String>,
    ) -> Result<(StatusCode, Option<String>, String), DavError> {
        let method_value = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        let mut request = self.client.request(method_value, url);
        if let Some((user, password)) = &self.user {
            request = request.basic_auth(user, Some(password));
        }
        for (name, value) in headers {
            if let Ok(value) = HeaderValue::from_str(value) {
                request = request.header(name, value);
            }
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let unreachable = |e: reqwest::Error| DavError::Unreachable {
            url: url.to_owned(),
            message: without_url(e),
        };
        let Some(runtime) = &self.runtime else {
            return Err(DavError::Unreachable {
                url: url.to_owned(),
                message: "the client has stopped".to_owned(),
            });
        };
        runtime.block_on(async {
            let response = request.send().await.map_err(unreachable)?;
            let status = response.status();
            let etag = response
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let text = response.text().await.map_err(unreachable)?;
            Ok((status, etag, text))
        })
    }

    fn status_error(method: &str, url: &str, status: StatusCode, body: &str) -> DavError {
        let detail: String = body.trim().chars().take(200).collect();
        DavError::Status {
            method: method.to_owned(),
            url: url.to_owned(),
            status: status.as_u16(),
            detail: if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            },
        }
    }

    /// A `PROPFIND` of `url` asking `props` (XML elements), at `depth`.
    pub(super) fn propfind(
        &self,
        url: &str,
        depth: u8,
        props: &str,
    ) -> Result<Vec<Member>, DavError> {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
             <D:propfind xmlns:D=\"DAV:\" xmlns:C=\"urn:ietf:params:xml:ns:caldav\">\
             <D:prop>{props}</D:prop></D:propfind>"
        );
        let headers = [
            (
                reqwest::header::HeaderName::from_static("depth"),
                depth.to_string(),
            ),
            (CONTENT_TYPE, "application/xml; charset=utf-8".to_owned()),
        ];
        let (status, _, text) = self.request("PROPFIND", url, &headers, Some(body))?;
        if status != StatusCode::MULTI_STATUS {
            return Err(Self::status_error("PROPFIND", url, status, &text));
        }
        Ok(parse_multistatus(url, &text)?.1)
    }

    /// An RFC 6578 `sync-collection` report from `token` (empty: everything).
    pub(super) fn sync(&self, url: &str, token: &str) -> Result<SyncReport, DavError> {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
             <D:sync-collection xmlns:D=\"DAV:\"><D:sync-token>{}</D:sync-token>\
             <D:sync-level>1</D:sync-level><D:prop><D:getetag/></D:prop></D:sync-collection>",
            xml_escape(token)
        );
        let headers = [(CONTENT_TYPE, "application/xml; charset=utf-8".to_owned())];
        let (status, _, text) = self.request("REPORT", url, &headers, Some(body))?;
        if matches!(status, StatusCode::FORBIDDEN | StatusCode::CONFLICT)
            && text.contains("valid-sync-token")
        {
            return Err(DavError::TokenRejected);
        }
        if status != StatusCode::MULTI_STATUS {
            return Err(Self::status_error("REPORT", url, status, &text));
        }
        let (token, members) = parse_multistatus(url, &text)?;
        let own = normalize_href(url);
        let mut report = SyncReport {
            token: token.unwrap_or_default(),
            ..SyncReport::default()
        };
        for member in members {
            // The collection itself appears only to say the answer was cut short.
            if normalize_href(&member.href) == own || url.ends_with(&member.href) {
                report.truncated = true;
                continue;
            }
            report.members.push(member);
        }
        if report.token.is_empty() {
            return Err(DavError::Malformed {
                url: url.to_owned(),
                message: "no sync-token in the answer".to_owned(),
            });
        }
        Ok(report)
    }

    /// A `calendar-multiget` of `hrefs`: each member's ETag and body.
    pub(super) fn multiget(&self, url: &str, hrefs: &[String]) -> Result<Vec<Member>, DavError> {
        let mut body = String::from(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
             <C:calendar-multiget xmlns:D=\"DAV:\" xmlns:C=\"urn:ietf:params:xml:ns:caldav\">\
             <D:prop><D:getetag/><C:calendar-data/></D:prop>",
        );
        for href in hrefs {
            body.push_str("<D:href>");
            body.push_str(&xml_escape(href));
            body.push_str("</D:href>");
        }
        body.push_str("</C:calendar-multiget>");
        let headers = [
            (
                reqwest::header::HeaderName::from_static("depth"),
                "1".to_owned(),
            ),
            (CONTENT_TYPE, "application/xml; charset=utf-8".to_owned()),
        ];
        let (status, _, text) = self.request("REPORT", url, &headers, Some(body))?;
        if status != StatusCode::MULTI_STATUS {
            return Err(Self::status_error("REPORT", url, status, &text));
        }
        Ok(parse_multistatus(url, &text)?.1)
    }

    /// Writes `body` at `url`: only if its ETag is `etag`, or, with `None`, only if
    /// nothing is there.
    pub(super) fn put(
        &self,
        url: &str,
        body: String,
        etag: Option<&str>,
    ) -> Result<Written, DavError> {
        let condition = match etag {
            Some(etag) => (IF_MATCH, etag.to_owned()),
            None => (IF_NONE_MATCH, "*".to_owned()),
        };
        let headers = [
            condition,
            (CONTENT_TYPE, "text/calendar; charset=utf-8".to_owned()),
        ];
        let (status, etag, text) = self.request("PUT", url, &headers, Some(body))?;
        written("PUT", url, status, etag, &text)
    }

    /// Deletes `url` only if its ETag is `etag`.
    pub(super) fn delete(&self, url: &str, etag: &str) -> Result<Written, DavError> {
        let headers = [(IF_MATCH, etag.to_owned())];
        let (status, _, text) = self.request("DELETE", url, &headers, None)?;
        if status == StatusCode::NOT_FOUND {
            return Ok(Written::Done(None));
        }
        written("DELETE", url, status, None, &text)
    }
}

fn written(
    method: &str,
    url: &str,
    status: StatusCode,
    etag: Option<String>,
    text: &str,
) -> Result<Written, DavError> {
    if status.is_success() {
        return Ok(Written::Done(etag));
    }
    if status == StatusCode::PRECONDITION_FAILED {
        return Ok(Written::Precondition);
    }
    if status.is_client_error()
        && !matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
        )
    {
        let message: String = text.trim().chars().take(300).collect();
        return Ok(Written::Refused(status.as_u16(), message));
    }
    Err(Dav::status_error(method, url, status, text))
}

/// A reqwest error's message without the URL it repeats (which may carry a user).
fn without_url(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

pub(super) fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An href's path, decoded, for comparing hrefs written differently.
pub(super) fn normalize_href(href: &str) -> String {
    let path = match href.find("://") {
        Some(scheme) => {
            let rest = &href[scheme + 3..];
            rest.find('/').map_or("/", |slash| &rest[slash..])
        }
        None => href,
    };
    let bytes = path.as_bytes();
    let mut i = 0;
    let mut decoded = Vec::with_capacity(bytes.len());
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&path[i + 1..i + 3], 16)
        {
            decoded.push(byte);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&decoded)
        .trim_end_matches('/')
        .to_owned()
}

/// Reads a multistatus answer: its sync token, if any, and its members.
fn parse_multistatus(url: &str, text: &str) -> Result<(Option<String>, Vec<Member>), DavError> {
    let malformed = |message: String| DavError::Malformed {
        url: url.to_owned(),
        message,
    };
    let mut reader = Reader::from_str(text);
    let mut path: Vec<String> = Vec::new();
    let mut token = None;
    let mut members = Vec::new();
    let mut member = Member::default();
    // Within a propstat: its status, and what it held.
    let mut propstat_ok = true;
    let mut pending_etag = None;
    let mut pending_body = None;
    let mut pending_link = None;
    let mut pending_collection = false;
    let mut response_status_missing = false;
    let mut text_buf = String::new();
    loop {
        let event = reader.read_event().map_err(|e| malformed(e.to_string()))?;
        match event {
            Event::Start(start) => {
                let name = local(start.name().as_ref());
                if name == "response" {
                    member = Member::default();
                    response_status_missing = false;
                }
                if name == "propstat" {
                    propstat_ok = true;
                    pending_etag = None;
                    pending_body = None;
                    pending_link = None;
                    pending_collection = false;
                }
                path.push(name);
                text_buf.clear();
            }
            Event::Empty(empty) => {
                let name = local(empty.name().as_ref());
                if name == "collection" && path.iter().any(|p| p == "resourcetype") {
                    pending_collection = true;
                }
            }
            Event::Text(t) => {
                let decoded = t.decode().map_err(|e| malformed(e.to_string()))?;
                let unescaped =
                    quick_xml::escape::unescape(&decoded).map_err(|e| malformed(e.to_string()))?;
                text_buf.push_str(&unescaped);
            }
            Event::CData(c) => {
                text_buf.push_str(&String::from_utf8_lossy(&c));
            }
            Event::GeneralRef(r) => {
                let name = String::from_utf8_lossy(&r).into_owned();
                let resolved = match name.as_str() {
                    "amp" => "&".to_owned(),
                    "lt" => "<".to_owned(),
                    "gt" => ">".to_owned(),
                    "quot" => "\"".to_owned(),
                    "apos" => "'".to_owned(),
                    other => match other.strip_prefix('#') {
                        Some(code) => {
                            let n = match code.strip_prefix('x') {
                                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                                None => code.parse().ok(),
                            };
                            n.and_then(char::from_u32)
                                .map(String::from)
                                .unwrap_or_default()
                        }
                        None => String::new(),
                    },
                };
                text_buf.push_str(&resolved);
            }
            Event::End(end) => {
                let name = local(end.name().as_ref());
                let parent = path.len().checked_sub(2).and_then(|i| path.get(i)).cloned();
                match (name.as_str(), parent.as_deref()) {
                    ("sync-token", Some("multistatus")) => token = Some(text_buf.trim().to_owned()),
                    ("href", Some("response")) => member.href = text_buf.trim().to_owned(),
                    ("href", Some("current-user-principal" | "calendar-home-set")) => {
                        pending_link = Some(text_buf.trim().to_owned());
                    }
                    // A member gone (404) has a status of its own and no propstat.
                    ("status", Some("response")) if !text_buf.contains(" 200") => {
                        response_status_missing = true;
                    }
                    ("status", Some("propstat")) => propstat_ok = text_buf.contains(" 200"),
                    ("getetag", _) => pending_etag = Some(text_buf.trim().to_owned()),
                    ("calendar-data", _) => pending_body = Some(text_buf.clone()),
                    ("propstat", _) if propstat_ok => {
                        member.etag = pending_etag.take().or(member.etag.take());
                        member.body = pending_body.take().or(member.body.take());
                        member.link = pending_link.take().or(member.link.take());
                        member.collection |= pending_collection;
                    }
                    ("response", _) => {
                        if response_status_missing {
                            member.etag = None;
                            member.body = None;
                        }
                        members.push(std::mem::take(&mut member));
                    }
                    _ => {}
                }
                path.pop();
                text_buf.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok((token, members))
}

/// An element's name without its namespace prefix.
fn local(name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    match name.rsplit_once(':') {
        Some((_, local)) => local.to_owned(),
        None => name.into_owned(),
    }
}
