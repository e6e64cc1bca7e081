//! Webhooks: an app's call that a record changed. The agent's HTTP server hands
//! each call to the tool's [`Webhooks`], which checks its signature (HMAC-SHA256
//! of the body with a shared secret), notes which record changed, and wakes the
//! tool loop; the connector then fetches the record. A webhook is only a wake-up:
//! its body is never taken for the record, so a lost or forged-but-valid call costs
//! a fetch, never data.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::contract::Wake;

/// The header carrying the signature, unless configured otherwise.
pub const SIGNATURE_HEADER_DEFAULT: &str = "X-Concord-Signature";
/// Records noted and not fetched yet, at most; beyond it the connector lists the
/// app again instead (nothing is lost, the calls are only summarised).
const QUEUE_MAX: usize = 100_000;
/// Longest body read as a webhook.
pub const BODY_MAX: usize = 1 << 20;

/// Why a webhook call was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    /// No signature header.
    #[error("no `{0}` header: webhooks must be signed with the shared secret")]
    Unsigned(String),
    /// The signature does not match the body.
    #[error("the signature in `{0}` does not match the body")]
    BadSignature(String),
    /// The body is not the JSON expected.
    #[error("the webhook's body {0}")]
    Malformed(String),
}

/// One tool's webhook endpoint.
pub struct Webhooks {
    key: ring::hmac::Key,
    header: String,
    /// JSON pointer to the collection's name in a call, if calls name one.
    collection: Option<String>,
    /// JSON pointer to the record's id in a call.
    id: String,
    /// Records noted: (the collection as the app names it, if given; the id).
    queue: Mutex<VecDeque<(Option<String>, String)>>,
    /// More calls came than the queue holds: list the app instead.
    overflowed: AtomicBool,
    wake: Mutex<Option<Wake>>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Webhooks")
            .field("header", &self.header)
            .field("collection", &self.collection)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// An endpoint checking signatures made with `secret`, sent in `header`; a
    /// call names its record's id at the JSON pointer `id` (`/record/id`) and, if
    /// `collection` is given, its collection at that pointer.
    pub fn new(secret: &[u8], header: &str, collection: Option<&str>, id: &str) -> Webhooks {
        Webhooks {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            header: header.to_owned(),
            collection: collection.map(str::to_owned),
            id: id.to_owned(),
            queue: Mutex::new(VecDeque::new()),
            overflowed: AtomicBool::new(false),
            wake: Mutex::new(None),
        }
    }

    /// The header the signature comes in.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// Takes one call: `signature` is the header's value (hex, optionally
    /// `sha256=`-prefixed). Fast: it only notes the record and wakes the connector.
    pub fn receive(&self, signature: Option<&str>, body: &[u8]) -> Result<(), WebhookError> {
        let signature = signature.ok_or_else(|| WebhookError::Unsigned(self.header.clone()))?;
        let hex = signature.trim();
        let hex = hex.strip_prefix("sha256=").unwrap_or(hex);
        let tag =
            data_from_hex(hex).ok_or_else(|| WebhookError::BadSignature(self.header.clone()))?;
        ring::hmac::verify(&self.key, body, &tag)
            .map_err(|_| WebhookError::BadSignature(self.header.clone()))?;
        let json: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| WebhookError::Malformed(format!("is not JSON: {e}")))?;
        let id = json
            .pointer(&self.id)
            .and_then(id_text)
            .ok_or_else(|| WebhookError::Malformed(format!("has no record id at `{}`", self.id)))?;
        let collection = match &self.collection {
            Some(pointer) => Some(
                json.pointer(pointer)
                    .and_then(|c| c.as_str())
                    .ok_or_else(|| {
                        WebhookError::Malformed(format!("has no collection name at `{pointer}`"))
                    })?
                    .to_owned(),
            ),
            None => None,
        };
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.len() >= QUEUE_MAX {
                self.overflowed.store(true, Ordering::Release);
            } else {
                queue.push_back((collection, id));
            }
        }
        if let Some(wake) = &*self.wake.lock().unwrap_or_else(|e| e.into_inner()) {
            wake();
        }
        Ok(())
    }

    pub(super) fn subscribe(&self, wake: Wake) {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake);
    }

    /// Whether calls wait to be fetched.
    pub(super) fn pending(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
            || !self
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
    }

    /// The records noted since the last call, and whether some calls were only
    /// summarised (the queue overflowed): then the app must be listed.
    pub(super) fn drain(&self) -> (Vec<(Option<String>, String)>, bool) {
        let calls = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let overflowed = self.overflowed.swap(false, Ordering::AcqRel);
        (calls.into(), overflowed)
    }

    /// Puts back calls a capture could not fetch (the app failed), to try again.
    pub(super) fn requeue(&self, calls: Vec<(Option<String>, String)>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for call in calls.into_iter().rev() {
            queue.push_front(call);
        }
    }
}

/// A record id as text: a string, or an integer.
pub(super) fn id_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn data_from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&key, body);
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_signed_call_is_noted_and_a_forged_one_refused() {
        let hooks = Webhooks::new(
            b"s3cret",
            SIGNATURE_HEADER_DEFAULT,
            Some("/collection"),
            "/record/id",
        );
        let body = br#"{"collection":"customers","action":"update","record":{"id":"abc"}}"#;
        let good = format!("sha256={}", sign(b"s3cret", body));
        assert_eq!(hooks.receive(Some(&good), body), Ok(()));
        let bad = sign(b"other", body);
        assert_eq!(
            hooks.receive(Some(&bad), body),
            Err(WebhookError::BadSignature(
                SIGNATURE_HEADER_DEFAULT.to_owned()
            ))
        );
        assert!(matches!(
            hooks.receive(None, body),
            Err(WebhookError::Unsigned(_))
        ));
        assert!(matches!(
            hooks.receive(Some("zz"), body),
            Err(WebhookError::BadSignature(_))
        ));
        let (calls, overflowed) = hooks.drain();
        assert_eq!(calls, [(Some("customers".to_owned()), "abc".to_owned())]);
        assert!(!overflowed);
    }

    #[test]
    fn a_signed_call_without_an_id_is_malformed() {
        let hooks = Webhooks::new(b"k", SIGNATURE_HEADER_DEFAULT, None, "/record/id");
        let body = br#"{"record":{}}"#;
        let signature = sign(b"k", body);
        assert_eq!(
            hooks.receive(Some(&signature), body),
            Err(WebhookError::Malformed(
                "has no record id at `/record/id`".to_owned()
            ))
        );
        assert!(!hooks.pending());
    }
}
