//! Threshold emails: what they say (subject, plain text and HTML with the usage bar, the top
//! integrations and what to do) and how they leave (SMTP through lettre, retried with backoff).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use lettre::address::Envelope;
use lettre::message::header::{self, ContentType, HeaderName, HeaderValue, Headers};
use lettre::message::{Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{SmtpConfig, SmtpSecurity};
use crate::markup::escape;
use crate::meter::Level as Color;
use crate::metrics::Metrics;

use super::Thresholds;

/// How long one SMTP exchange (connect, TLS, AUTH, the message) may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The row of calls that did not go through the proxy.
const OUTSIDE: &str = "(outside callmeter)";
/// Backoff between delivery attempts: doubling from the first, capped at the last.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(5 * 60);
/// Backoff applies for this long; after that the SMTP server is taken to be down for a while.
const FAST_RETRIES_FOR: Duration = Duration::from_secs(60 * 60);
/// Then an attempt every this long, while callmeter runs: often enough that the email follows
/// soon after the server is back, rarely enough to keep the logs readable.
const SLOW_RETRY: Duration = Duration::from_secs(15 * 60);

/// Why the mailer cannot be built from `[smtp]`.
#[derive(Debug, thiserror::Error)]
pub enum MailerError {
    #[error("smtp.from {from:?} is not an address lettre accepts: {source}")]
    From {
        from: String,
        source: lettre::address::AddressError,
    },
    #[error("smtp.ca {path}: {error}")]
    Ca { path: String, error: String },
    #[error("TLS settings for {host}: {source}")]
    Tls {
        host: String,
        source: lettre::transport::smtp::Error,
    },
}

/// The SMTP transport of `[smtp]`.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn new(cfg: &SmtpConfig) -> Result<Self, MailerError> {
        let from: Mailbox = cfg.from.parse().map_err(|source| MailerError::From {
            from: cfg.from.clone(),
            source,
        })?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host)
            .port(cfg.port)
            .timeout(Some(SMTP_TIMEOUT));
        if cfg.security != SmtpSecurity::None {
            let mut params = TlsParameters::builder(cfg.host.clone());
            if let Some(path) = &cfg.ca {
                let ca_error = |error: String| MailerError::Ca {
                    path: path.display().to_string(),
                    error,
                };
                let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
                // lettre takes a file without a certificate as an empty list, and the TLS
                // handshake would fail only when a threshold email is due.
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .filter(Result::is_ok)
                    .count();
                if certs == 0 {
                    return Err(ca_error("holds no PEM certificate".to_owned()));
                }
                let cert = Certificate::from_pem(&pem).map_err(|e| ca_error(e.to_string()))?;
                params = params.add_root_certificate(cert);
            }
            let params = params.build_rustls().map_err(|source| MailerError::Tls {
                host: cfg.host.clone(),
                source,
            })?;
            builder = builder.tls(match cfg.security {
                SmtpSecurity::Tls => Tls::Wrapper(params),
                _ => Tls::Required(params),
            });
        }
        if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Mailer {
            transport: builder.build(),
            from,
        })
    }

    pub fn from(&self) -> &Mailbox {
        &self.from
    }

    /// One attempt: one SMTP transaction handing `raw` (the message of `email`) to the server
    /// for `recipients`.
    pub async fn send(
        &self,
        email: &Outgoing,
        raw: &[u8],
        recipients: &[String],
    ) -> Result<(), SendMailError> {
        let envelope = email.envelope(recipients)?;
        self.transport.send_raw(&envelope, raw).await?;
        Ok(())
    }
}

/// Why one attempt to send an email failed.
#[derive(Debug, thiserror::Error)]
pub enum SendMailError {
    #[error("the saved email has no usable sender or recipient: {0}")]
    Envelope(#[from] lettre::error::Error),
    #[error(transparent)]
    Smtp(#[from] lettre::transport::smtp::Error),
}

impl SendMailError {
    /// The server refused for good (a 5xx answer): about a recipient, the sender or the login.
    fn is_permanent(&self) -> bool {
        matches!(self, SendMailError::Smtp(e) if e.is_permanent())
    }
}

/// A threshold email as it waits to be sent: kept in the org's saved notification state from
/// the moment its crossing is recorded until the SMTP server took it, so that neither a
/// restart nor an SMTP server that is down for a while loses it (a crash just after the
/// server took it sends it again: a warning twice rather than never).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// Tells the org's waiting emails apart.
    pub key: u64,
    pub subject: String,
    pub from: String,
    /// The recipients it was built for. It goes to the org's notify addresses as they are at
    /// each attempt (the admin may have corrected them since); to these only when the org has
    /// none any more.
    pub to: Vec<String>,
    /// The whole message (RFC 5322), base64.
    pub raw: String,
    /// When the crossing was recorded (Unix ms).
    pub created_ms: u64,
}

impl Outgoing {
    pub fn new(key: u64, subject: String, message: &Message, created_ms: u64) -> Self {
        let envelope = message.envelope();
        Outgoing {
            key,
            subject,
            from: envelope.from().map(Address::to_string).unwrap_or_default(),
            to: envelope.to().iter().map(Address::to_string).collect(),
            raw: base64::engine::general_purpose::STANDARD.encode(message.formatted()),
            created_ms,
        }
    }

    /// The message with its `To:` header naming `to` rather than the recipients it was built
    /// for (the rest is as built, Message-ID and Date included).
    pub fn message_to(&self, to: &[String]) -> Vec<u8> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&self.raw)
            .unwrap_or_default();
        if to == self.to.as_slice() {
            return raw;
        }
        // lettre wrote it: CRLF lines, the header block ends at the first empty line.
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            return raw;
        };
        let (head, body) = raw.split_at(end + 2);
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut in_to = false;
        for line in head.split_inclusive(|&b| b == b'\n') {
            let folded = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
            if !folded {
                in_to = line.len() >= 3 && line[..3].eq_ignore_ascii_case(b"to:");
            }
            if !in_to {
                out.extend_from_slice(line);
            }
        }
        let mailboxes: Mailboxes = to
            .iter()
            .filter_map(|a| a.parse::<Mailbox>().ok())
            .collect();
        let mut headers = Headers::new();
        headers.set(header::To::from(mailboxes));
        out.extend_from_slice(headers.to_string().as_bytes());
        out.extend_from_slice(body);
        out
    }

    fn envelope(&self, recipients: &[String]) -> Result<Envelope, lettre::error::Error> {
        let from = self.from.parse::<Address>().ok();
        let to = recipients.iter().filter_map(|a| a.parse::<Address>().ok());
        Envelope::new(from, to.collect())
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every recipient has it, but those the server refused for good while taking it for
    /// others (an address that no longer exists).
    Sent,
    /// Not sent by the time its crossing was a day old: stale news, dropped.
    Expired,
    /// The proxy stops; it stays waiting for the next start.
    Stopped,
}

/// Sends `email` to the org's current notify addresses, retrying until every recipient has
/// it, it `expires`, or the proxy stops: with backoff for [`FAST_RETRIES_FOR`], then every
/// [`SLOW_RETRY`], and at once when the notify addresses change (the admin fixed a typo).
/// All recipients go in one SMTP transaction, but a server that refuses one address (a
/// colleague who left) fails the whole transaction: then each is sent on its own, and a
/// recipient the server refuses for good is given up once it has taken the email for another
/// (the refusal is then about that address, not the sender or the login, which a retry may
/// fix). Every attempt is counted in `callmeter_notifications_total` and failures are logged;
/// nothing here touches the request path.
pub async fn deliver(
    mailer: Arc<Mailer>,
    email: &Outgoing,
    org: &str,
    metrics: Arc<Metrics>,
    thresholds: Arc<Thresholds>,
    expires: Instant,
    mut stop: watch::Receiver<bool>,
) -> Delivery {
    let subject = &email.subject;
    let started = Instant::now();
    let mut changed = thresholds.subscribe();
    let mut delay = FIRST_RETRY;
    let mut slow = false;
    // Recipients the server took it for, and those it refused for good after taking it for
    // another: neither is tried again, whatever the notify addresses become.
    let mut has_it: Vec<String> = Vec::new();
    let mut given_up: Vec<String> = Vec::new();
    let mut refused = Vec::new();
    let mut taken = false;
    for attempt in 1u32.. {
        let to = recipients(&thresholds, org, email);
        let mut pending: Vec<String> = to
            .iter()
            .filter(|r| !has_it.contains(r) && !given_up.contains(r))
            .cloned()
            .collect();
        if pending.is_empty() {
            // The addresses it was failing for are no longer in notify.
            tracing::info!(%org, %subject, "every current notify address has the threshold email");
            return Delivery::Sent;
        }
        let tried = pending.clone();
        let raw = email.message_to(&to);
        let (took, failed) = send_to(&mailer, email, &raw, &mut pending, &mut refused).await;
        has_it.extend(
            tried
                .into_iter()
                .filter(|r| !pending.contains(r) && refused.iter().all(|(x, _)| x != r)),
        );
        taken |= took;
        if taken {
            for (recipient, error) in refused.drain(..) {
                tracing::error!(%org, %subject, %recipient, %error,
                    "the SMTP server refused this recipient of a threshold email; the others get it (check the org's notify addresses)");
                given_up.push(recipient);
            }
        } else {
            // Nobody took it yet: a refusal may be about the sender or the login, so retry.
            pending.extend(refused.drain(..).map(|(recipient, _)| recipient));
        }
        match failed {
            None => {
                metrics.notification(org, true);
                tracing::info!(%org, %subject, attempt, "threshold email sent");
                return Delivery::Sent;
            }
            Some(_) if pending.is_empty() => {
                metrics.notification(org, false);
                return Delivery::Sent;
            }
            Some(error) => {
                metrics.notification(org, false);
                if !slow && started.elapsed() + delay > FAST_RETRIES_FOR {
                    slow = true;
                    delay = SLOW_RETRY;
                    tracing::error!(%org, %subject, attempt, %error, retry_in = ?delay,
                        "threshold email not sent for an hour; retrying every 15 minutes until it is a day old (check [smtp] and the SMTP server)");
                } else {
                    tracing::warn!(%org, %subject, attempt, %error, retry_in = ?delay,
                        "threshold email not sent; will retry");
                }
                if Instant::now() + delay > expires {
                    tracing::error!(%org, %subject, attempt,
                        "threshold email never sent and its crossing is a day old: dropped");
                    return Delivery::Expired;
                }
            }
        }
        let wake = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                Ok(()) = changed.changed() => {
                    // Corrected addresses are tried at once, not after up to 15 minutes.
                    if recipients(&thresholds, org, email) != to {
                        break;
                    }
                }
                _ = stop.wait_for(|s| *s) => {
                    tracing::warn!(%org, %subject, "shutting down: threshold email not sent yet; it is sent at the next start");
                    return Delivery::Stopped;
                }
            }
        }
        if !slow {
            delay = (delay * 2).min(MAX_RETRY);
        }
    }
    Delivery::Expired
}

/// Who `email` goes to now: the org's notify addresses, or, when it has none any more (the
/// threshold deleted), those it was built for: the crossing happened and was not told yet.
fn recipients(thresholds: &Thresholds, org: &str, email: &Outgoing) -> Vec<String> {
    let now = thresholds.notify(org);
    if now.is_empty() {
        email.to.clone()
    } else {
        now
    }
}

/// One attempt for the recipients still `pending`: those the server took leave it, those it
/// refused for good move to `refused`. Returns whether the server took the email for anyone,
/// and the last error.
async fn send_to(
    mailer: &Mailer,
    email: &Outgoing,
    raw: &[u8],
    pending: &mut Vec<String>,
    refused: &mut Vec<(String, String)>,
) -> (bool, Option<SendMailError>) {
    let error = match mailer.send(email, raw, pending).await {
        Ok(()) => {
            pending.clear();
            return (true, None);
        }
        Err(error) => error,
    };
    if pending.len() == 1 || !error.is_permanent() {
        if error.is_permanent() {
            refused.extend(pending.drain(..).map(|r| (r, error.to_string())));
        }
        return (false, Some(error));
    }
    // One refused address fails the whole transaction: each recipient on its own.
    let (mut taken, mut failed) = (false, None);
    for recipient in std::mem::take(pending) {
        match mailer
            .send(email, raw, std::slice::from_ref(&recipient))
            .await
        {
            Ok(()) => taken = true,
            Err(error) => {
                if error.is_permanent() {
                    refused.push((recipient, error.to_string()));
                } else {
                    pending.push(recipient);
                }
                failed = Some(error);
            }
        }
    }
    (taken, failed)
}

/// What an email is about.
#[derive(Debug, Clone)]
pub struct Alert {
    pub org: String,
    /// `None`: the org's usage against its limit; `Some`: an integration's against its quota.
    pub integration: Option<QuotaAlert>,
    /// The level as the admin wrote it (`80%`, `95000`) and in calls.
    pub level: String,
    pub level_calls: u64,
    /// The org's calls (org) or the integration's (integration) in the window.
    pub used: u64,
    /// The org's calls in the window: what each row of `top` is a share of, in either email.
    pub org_used: u64,
    /// The limit (org) or quota (integration), when known.
    pub budget: Option<u64>,
    pub window_minutes: u32,
    /// The org's integrations by calls in the window, most first: `(id, calls, quota)`.
    pub top: Vec<(String, u64, Option<u64>)>,
    /// Calls in the org's estimate that did not go through the proxy (known after a report).
    pub outside: Option<u64>,
    pub recipients: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct QuotaAlert {
    pub id: String,
    /// What happens to its calls at the quota (`reject`, `queue`, `defer`).
    pub on_limit: &'static str,
}

impl Alert {
    fn percent(&self) -> Option<u64> {
        self.budget
            .filter(|&b| b > 0)
            .map(|b| (u128::from(self.used) * 100 / u128::from(b)) as u64)
    }

    fn color(&self) -> Color {
        Color::of(self.percent().unwrap_or(0) as f64)
    }

    fn window(&self) -> String {
        if self.window_minutes % 60 == 0 {
            format!("{} hours", self.window_minutes / 60)
        } else {
            format!("{} minutes", self.window_minutes)
        }
    }

    /// `[callmeter] acme: 82% of daily Salesforce API calls used (82,013 / 100,000)`.
    pub fn subject(&self) -> String {
        let used = thousands(self.used);
        match (&self.integration, self.percent(), self.budget) {
            (None, Some(p), Some(b)) => format!(
                "[callmeter] {}: {p}% of daily Salesforce API calls used ({used} / {})",
                self.org,
                thousands(b)
            ),
            (None, _, _) => format!(
                "[callmeter] {}: {used} Salesforce API calls used in {} (threshold {})",
                self.org,
                self.window(),
                thousands(self.level_calls)
            ),
            (Some(i), p, b) => format!(
                "[callmeter] {}/{}: {}% of its Salesforce API call quota used ({used} / {})",
                self.org,
                i.id,
                p.unwrap_or(0),
                thousands(b.unwrap_or(0))
            ),
        }
    }

    fn headline(&self) -> String {
        let used = thousands(self.used);
        let level = if self.level.ends_with('%') {
            format!("{} ({} calls)", self.level, thousands(self.level_calls))
        } else {
            format!("{} calls", thousands(self.level_calls))
        };
        match (&self.integration, self.percent(), self.budget) {
            (None, Some(p), Some(b)) => format!(
                "Org {} has used {p}% of its daily Salesforce API calls: {used} of {} in the last {}. \
                 That is past your threshold of {level}.",
                self.org,
                thousands(b),
                self.window()
            ),
            (None, _, _) => format!(
                "Org {} has used {used} Salesforce API calls in the last {}. That is past your \
                 threshold of {level}. (Its daily limit is not known yet.)",
                self.org,
                self.window()
            ),
            (Some(i), p, b) => format!(
                "Integration {} of org {} has used {}% of its quota: {used} of {} calls in the \
                 last {}. That is past your threshold of {level}. At its quota, its calls are \
                 {}.",
                i.id,
                self.org,
                p.unwrap_or(0),
                thousands(b.unwrap_or(0)),
                self.window(),
                match i.on_limit {
                    "queue" => "held in a queue until budget frees",
                    "defer" => "stored and replayed when budget frees",
                    _ => "rejected, as Salesforce rejects calls at the limit",
                }
            ),
        }
    }

    fn advice(&self) -> Vec<&'static str> {
        let mut out = vec![
            "Find out which integration spends the budget (the list above, or the status page of the callmeter admin listener) and slow it down: sync less often, sync fewer fields or objects, or sync in one direction only.",
            "Give busy integrations a quota (and on_limit = \"queue\" or \"defer\") in callmeter, so that one cannot use up the whole org's budget.",
        ];
        if self.integration.is_none() {
            out.push("If the usage is here to stay, buy more API calls from Salesforce.");
            out.push("Calls age out 24 hours after they were made, so usage falls by itself once the traffic slows down. At the limit Salesforce refuses every integration's calls with REQUEST_LIMIT_EXCEEDED.");
        } else {
            out.push("Or raise the integration's quota in the callmeter config, if the org's budget allows it.");
        }
        out
    }

    fn footer(&self) -> String {
        let hysteresis =
            self.budget.unwrap_or(self.level_calls) * super::crossing::HYSTERESIS_PERCENT / 100;
        format!(
            "You receive this because your address is in the notify list of the threshold of org {}. \
             The next email about this level comes when usage has fallen below {} calls and \
             crosses it again, or if usage is still above it a day from now; a higher level is \
             told at once.",
            self.org,
            thousands(self.level_calls.saturating_sub(hysteresis))
        )
    }

    fn plain_text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "{}\n", self.headline());
        if let Some(p) = self.percent() {
            let filled = (p.min(100) / 5) as usize;
            let _ = writeln!(
                t,
                "[{}{}] {p}% ({})\n",
                "#".repeat(filled),
                "-".repeat(20 - filled),
                color_name(self.color())
            );
        }
        if !self.top.is_empty() {
            let _ = writeln!(
                t,
                "Top integrations by calls in the last {}:",
                self.window()
            );
            let outside = self.outside.filter(|&o| o > 0);
            let width = self
                .top
                .iter()
                .map(|(id, ..)| id.len())
                .chain(outside.map(|_| OUTSIDE.len()))
                .max()
                .unwrap_or(0);
            for (id, calls, quota) in &self.top {
                let quota = quota
                    .map(|q| format!(", quota {}", thousands(q)))
                    .unwrap_or_default();
                let _ = writeln!(
                    t,
                    "  {id:<width$}  {:>12}  ({}% of used{quota})",
                    thousands(*calls),
                    share(*calls, self.org_used)
                );
            }
            if let Some(outside) = outside {
                let _ = writeln!(
                    t,
                    "  {OUTSIDE:<width$}  {:>12}  ({}% of used: calls Salesforce counted that did not go through callmeter)",
                    thousands(outside),
                    share(outside, self.org_used)
                );
            }
            t.push('\n');
        }
        let _ = writeln!(t, "What to do:");
        for a in self.advice() {
            let _ = writeln!(t, "  - {a}");
        }
        let _ = writeln!(t, "\n-- \n{}", self.footer());
        t
    }

    fn html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title></head>\
             <body style=\"font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1f2328;max-width:640px;margin:0 auto;padding:16px\">\
             <p style=\"font-size:16px;line-height:1.5\">{}</p>",
            escape(&self.subject()),
            escape(&self.headline())
        );
        if let Some(p) = self.percent() {
            let c = self.color();
            let _ = write!(
                h,
                "<div data-color=\"{name}\" style=\"background:#e5e7eb;border-radius:6px;height:20px;width:100%\">\
                 <div style=\"background:{hex};width:{w}%;height:20px;border-radius:6px\"></div></div>\
                 <p style=\"margin:4px 0 16px;color:{hex};font-weight:600\">{p}% used</p>",
                name = color_name(c),
                hex = color_hex(c),
                w = p.min(100),
            );
        }
        if !self.top.is_empty() {
            let _ = write!(
                h,
                "<h3 style=\"font-size:15px;margin:16px 0 8px\">Top integrations by calls in the last {}</h3>\
                 <table style=\"border-collapse:collapse;font-size:14px\">\
                 <tr><th align=\"left\" style=\"padding:4px 12px 4px 0\">Integration</th>\
                 <th align=\"right\" style=\"padding:4px 12px\">Calls</th>\
                 <th align=\"right\" style=\"padding:4px 12px\">Share</th>\
                 <th align=\"right\" style=\"padding:4px 0 4px 12px\">Quota</th></tr>",
                escape(&self.window())
            );
            let mut rows: Vec<(String, u64, Option<u64>)> = self.top.clone();
            if let Some(outside) = self.outside.filter(|&o| o > 0) {
                rows.push((OUTSIDE.to_owned(), outside, None));
            }
            for (id, calls, quota) in rows {
                let _ = write!(
                    h,
                    "<tr><td style=\"padding:4px 12px 4px 0\">{}</td>\
                     <td align=\"right\" style=\"padding:4px 12px\">{}</td>\
                     <td align=\"right\" style=\"padding:4px 12px\">{}%</td>\
                     <td align=\"right\" style=\"padding:4px 0 4px 12px\">{}</td></tr>",
                    escape(&id),
                    thousands(calls),
                    share(calls, self.org_used),
                    quota.map(thousands).unwrap_or_else(|| "none".to_owned())
                );
            }
            h.push_str("</table>");
        }
        h.push_str("<h3 style=\"font-size:15px;margin:16px 0 8px\">What to do</h3><ul style=\"font-size:14px;line-height:1.5;padding-left:20px\">");
        for a in self.advice() {
            let _ = write!(h, "<li>{}</li>", escape(a));
        }
        let _ = write!(
            h,
            "</ul><p style=\"font-size:12px;color:#57606a\">{}</p></body></html>",
            escape(&self.footer())
        );
        h
    }

    /// The email, multipart plain text and HTML.
    pub fn message(&self, from: &Mailbox) -> Result<Message, String> {
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let sequence = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let message_id = format!(
            "<callmeter.{nanos}.{}.{sequence}@{}>",
            std::process::id(),
            from.email.domain()
        );
        let mut builder = Message::builder()
            .from(from.clone())
            .subject(self.subject())
            .message_id(Some(message_id))
            // RFC 3834: an automatic message; out-of-office replies should not answer it.
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("Auto-Submitted"),
                "auto-generated".to_owned(),
            ));
        for to in &self.recipients {
            let mailbox: Mailbox = to
                .parse()
                .map_err(|e| format!("recipient {to:?} is not an address: {e}"))?;
            builder = builder.to(mailbox);
        }
        builder
            .multipart(
                MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_PLAIN)
                            .body(self.plain_text()),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_HTML)
                            .body(self.html()),
                    ),
            )
            .map_err(|e| e.to_string())
    }
}

fn share(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        0
    } else {
        (u128::from(part) * 100 / u128::from(whole)) as u64
    }
}

/// `82013` → `82,013`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn color_name(c: Color) -> &'static str {
    match c {
        Color::Green => "green",
        Color::Orange => "orange",
        Color::Red => "red",
    }
}

/// The bar colours of the status page and the emails (readable on white, colour-blind safe
/// enough with the percentage printed next to them).
pub fn color_hex(c: Color) -> &'static str {
    match c {
        Color::Green => "#2e7d32",
        Color::Orange => "#ef6c00",
        Color::Red => "#c62828",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert() -> Alert {
        Alert {
            org: "acme".into(),
            integration: None,
            level: "80%".into(),
            level_calls: 80_000,
            used: 82_013,
            org_used: 82_013,
            budget: Some(100_000),
            window_minutes: 1440,
            top: vec![
                ("salesloft".into(), 50_000, Some(60_000)),
                ("etl<script>".into(), 12_000, None),
            ],
            outside: Some(20_013),
            recipients: vec!["admin@example.com".into()],
        }
    }

    #[test]
    fn subject_reads_like_the_brief() {
        assert_eq!(
            alert().subject(),
            "[callmeter] acme: 82% of daily Salesforce API calls used (82,013 / 100,000)"
        );
        let quota = Alert {
            integration: Some(QuotaAlert {
                id: "salesloft".into(),
                on_limit: "queue",
            }),
            used: 3_640,
            budget: Some(4_000),
            ..alert()
        };
        assert_eq!(
            quota.subject(),
            "[callmeter] acme/salesloft: 91% of its Salesforce API call quota used (3,640 / 4,000)"
        );
        let unknown_limit = Alert {
            level: "80000".into(),
            budget: None,
            ..alert()
        };
        assert_eq!(
            unknown_limit.subject(),
            "[callmeter] acme: 82,013 Salesforce API calls used in 24 hours (threshold 80,000)"
        );
    }

    #[test]
    fn bodies_carry_the_bar_the_top_integrations_and_advice_escaped() {
        let a = alert();
        let text = a.plain_text();
        assert!(
            text.contains("[################----] 82% (orange)"),
            "{text}"
        );
        assert!(text.contains("salesloft"), "{text}");
        assert!(text.contains("What to do:"), "{text}");
        let html = a.html();
        assert!(
            html.contains("data-color=\"orange\"") && html.contains("#ef6c00"),
            "{html}"
        );
        assert!(html.contains("width:82%"), "{html}");
        assert!(html.contains("etl&lt;script&gt;") && !html.contains("etl<script>"));
        let message = a
            .message(&"callmeter <cm@example.com>".parse().unwrap())
            .unwrap();
        let raw = String::from_utf8(message.formatted()).unwrap();
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("To: admin@example.com"), "{raw}");
        assert!(raw.contains("Auto-Submitted: auto-generated"), "{raw}");
        assert!(raw.contains("Message-ID: <callmeter."), "{raw}");
        assert!(raw.contains("@example.com>"), "{raw}");
        assert!(raw.contains("Date: "), "{raw}");
    }

    /// A quota email lists the org's top integrations with their share of the org's calls, not
    /// of the integration's own (which gave "etl 12,000 (329% of used)").
    #[test]
    fn a_quota_emails_shares_are_not_above_100_percent() {
        let quota = Alert {
            integration: Some(QuotaAlert {
                id: "salesloft".into(),
                on_limit: "reject",
            }),
            level_calls: 3_200,
            used: 3_640,
            budget: Some(4_000),
            top: vec![
                ("etl".into(), 12_000, None),
                ("salesloft".into(), 3_640, Some(4_000)),
            ],
            outside: Some(20_013),
            ..alert()
        };
        let text = quota.plain_text();
        let shares: Vec<u64> = text
            .split("(")
            .filter_map(|rest| rest.split_once("% of used"))
            .filter_map(|(n, _)| n.trim().parse().ok())
            .collect();
        assert!(!shares.is_empty(), "{text}");
        assert!(
            shares.iter().all(|&s| s <= 100),
            "shares {shares:?} in:\n{text}"
        );
        let html = quota.html();
        assert!(!html.contains(">329%<"), "{html}");
    }

    /// An email waiting to be sent goes to the notify addresses as they are now: its `To:`
    /// names them, and the rest of the message is as built.
    #[test]
    fn a_waiting_email_names_the_current_recipients() {
        let from: Mailbox = "callmeter <cm@example.com>".parse().expect("from");
        let alert = Alert {
            recipients: vec!["amdin@example.com".into()],
            ..alert()
        };
        let email = Outgoing::new(0, alert.subject(), &alert.message(&from).expect("built"), 0);
        let built = String::from_utf8(email.message_to(&email.to.clone())).expect("utf-8");
        assert!(built.contains("To: amdin@example.com\r\n"), "{built}");

        let to = ["admin@example.com".to_owned(), "ops@example.com".to_owned()];
        let now = String::from_utf8(email.message_to(&to)).expect("utf-8");
        assert!(!now.contains("amdin"), "{now}");
        assert!(
            now.contains("\r\nTo: admin@example.com, ops@example.com\r\n"),
            "{now}"
        );
        let (head, body) = now.split_once("\r\n\r\n").expect("a header block");
        let (built_head, built_body) = built.split_once("\r\n\r\n").expect("a header block");
        assert_eq!(body, built_body);
        for line in built_head.lines().filter(|l| !l.starts_with("To:")) {
            assert!(head.contains(line), "{line:?} kept: {head}");
        }
    }

    /// After an hour of failures an email is not parked until the next start: it is tried
    /// every 15 minutes until its crossing is a day old (here it expires 3 hours from now).
    #[tokio::test(start_paused = true)]
    async fn after_an_hour_of_failures_an_email_is_retried_until_it_expires() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port(); // closed again: every attempt fails
        let toml = format!(
            "[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n[[org]]\nid = \"acme\"\n\
             instance_url = \"https://acme.my.salesforce.com\"\n[org.threshold]\nlevels = [\"80%\"]\n\
             notify = [\"admin@example.com\"]\n[smtp]\nhost = \"127.0.0.1\"\nport = {port}\n\
             security = \"none\"\nfrom = \"cm@example.com\"\n"
        );
        let cfg = crate::config::parse(&toml, std::path::Path::new("t.toml")).expect("config");
        let mailer = Arc::new(Mailer::new(cfg.smtp.as_ref().expect("smtp")).expect("mailer"));
        let thresholds = Arc::new(Thresholds::from_config(&cfg));
        let metrics = Metrics::new();
        let email = Outgoing::new(
            0,
            "s".into(),
            &alert().message(mailer.from()).expect("built"),
            0,
        );
        let (_stop, stop) = watch::channel(false);

        let started = Instant::now();
        let expires = started + Duration::from_secs(3 * 3600);
        let delivery = deliver(
            mailer,
            &email,
            "acme",
            metrics.clone(),
            thresholds,
            expires,
            stop,
        )
        .await;
        assert_eq!(delivery, Delivery::Expired);
        let elapsed = started.elapsed();
        assert!(
            elapsed > expires - started - SLOW_RETRY - Duration::from_secs(60),
            "retried until {elapsed:?} only"
        );
        let text = metrics.render(&crate::meter::Usage { orgs: Vec::new() });
        let failed: u64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("callmeter_notifications_total{org=\"acme\",result=\"failed\"} ")
            })
            .and_then(|n| n.parse().ok())
            .expect("the failed series");
        // The first hour has about 20 attempts (1 s, 2 s, ... then 5 minutes apart); the two
        // hours after it 8 more, 15 minutes apart.
        assert!(failed > 24, "{failed} attempts");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(82_013), "82,013");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    /// Every address the config accepts can be mailed: one the mailer refuses would make the
    /// email impossible to build, for its other recipients too.
    #[test]
    fn every_address_the_config_accepts_can_be_mailed() {
        let from: Mailbox = "callmeter <cm@example.com>".parse().expect("from");
        for address in [
            "john..doe@example.com",
            "admin.@example.com",
            ".admin@example.com",
            "admin@example..com",
            "admin@exam_ple.com",
            "ad\"min@example.com",
            "ops+sf@example.com",
        ] {
            let toml = format!(
                "[threshold]\nlevels = [\"80%\"]\nnotify = [\"{}\"]\n",
                address.replace('"', "\\\"")
            );
            let accepted =
                crate::config::parse_threshold(&toml, std::path::Path::new("t.toml")).is_ok();
            let alert = Alert {
                recipients: vec!["ops@example.com".into(), address.into()],
                ..alert()
            };
            let built = alert.message(&from).is_ok();
            assert!(
                !accepted || built,
                "{address:?} is accepted but cannot be mailed"
            );
            if ["admin@exam_ple.com", "ops+sf@example.com"].contains(&address) {
                assert!(accepted && built, "{address:?} is a usable address");
            }
        }
    }

    #[test]
    fn an_smtp_from_the_mailer_refuses_is_a_config_error() {
        let toml = "[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n[[org]]\nid = \"acme\"\n\
                    instance_url = \"https://acme.my.salesforce.com\"\n[smtp]\nhost = \"127.0.0.1\"\n\
                    security = \"none\"\nfrom = \"callmeter <call..meter@example.com>\"\n";
        // `callmeter check` must refuse what `callmeter serve` would fail on, naming the key.
        let err = crate::config::parse(toml, std::path::Path::new("t.toml"))
            .expect_err("an address the mailer refuses")
            .to_string();
        assert!(err.contains("smtp.from"), "{err}");
        let good = toml.replace("call..meter", "callmeter");
        let cfg = crate::config::parse(&good, std::path::Path::new("t.toml")).expect("config");
        assert!(Mailer::new(cfg.smtp.as_ref().expect("smtp")).is_ok());
    }
}
