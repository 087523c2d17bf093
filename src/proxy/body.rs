//! Request and response bodies as they pass through the proxy.
//!
//! Bodies stream: the proxy holds at most one frame of a body at a time, except for the few
//! kinds it must read. `RequestBody` replays a bounded prefix (read to classify a composite
//! batch or a SOAP call) before the rest of the stream. `ResponseBody` can feed a bounded
//! prefix of the response to a `BodyScanner` as it passes (SOAP usage headers, limit errors)
//! without holding the body back. Both are enums rather than boxed trait objects, so the common
//! case (a plain streamed body) costs no allocation.

use std::borrow::Cow;
use std::io::Read;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::error::ProxyError;
use super::pool::{BodyError, UpstreamBody};

/// A request body on its way upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, untouched.
    Stream(Incoming),
    /// A prefix already read (to classify the call), then whatever is left of the stream, or
    /// the trailers that ended it while it was read (boxed: they are rare). `held` accounts
    /// for the prefix in `HELD_BYTES` until it is handed on.
    Prefixed {
        prefix: Option<Bytes>,
        rest: Option<Incoming>,
        trailers: Option<Box<http::HeaderMap>>,
        held: Held,
    },
    /// No body.
    Empty,
    /// A body whose progress upstream is watched (`Upload`): boxed, as only uploads take it.
    Tracked(Box<RequestBody>, Arc<Upload>),
}

/// A request body read to be held (`RequestBody::collect_limited`).
#[derive(Debug)]
pub enum Collected {
    Whole(Bytes),
    /// Longer than the limit.
    TooLarge,
    /// It ends with trailers, which a held body does not keep.
    Trailers,
    /// The bodies the proxy holds already take all of `HELD_BYTES`.
    Busy,
}

/// The request-body bytes the proxy holds at once while it reads them (to cost a SOAP call
/// or a Composite Batch, to learn a GET body's length, to store a deferred call), over all
/// requests. Each read is bounded on its own, but a client trickling bodies on many HTTP/2
/// streams and connections would make the sum grow without bound: one connection of 200
/// streams held 200 MiB. Past this, a body is no longer read: a call is costed as a body
/// not read (the conservative count) and streams on, a deferred call is refused (503).
pub static HELD_BYTES: HeldBudget = HeldBudget::new(64 << 20);

/// A bound on bytes held, shared by the holders (see `HELD_BYTES`).
#[derive(Debug)]
pub struct HeldBudget {
    held: AtomicUsize,
    cap: usize,
}

impl HeldBudget {
    pub const fn new(cap: usize) -> Self {
        HeldBudget {
            held: AtomicUsize::new(0),
            cap,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// An account holding nothing yet.
    pub fn account(&'static self) -> Held {
        Held {
            budget: Some(self),
            bytes: 0,
        }
    }
}

/// Bytes one body holds against a `HeldBudget`, given back when dropped.
#[derive(Debug, Default)]
pub struct Held {
    budget: Option<&'static HeldBudget>,
    bytes: usize,
}

impl Held {
    /// Counts `bytes` more (already read: they are held whatever the budget); false once the
    /// budget is over its cap, when the holder should read no more.
    fn grow(&mut self, bytes: usize) -> bool {
        let Some(budget) = self.budget else {
            return true;
        };
        self.bytes += bytes;
        // Relaxed: a count, ordering no other memory; the cap is a bound, not a fence.
        budget.held.fetch_add(bytes, Ordering::Relaxed) + bytes <= budget.cap
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(budget) = self.budget {
            budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// A message's content coding, as far as the proxy reads bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// No Content-Encoding, or only `identity`.
    Identity,
    Gzip,
    Deflate,
    /// Another coding, or several (`gzip, br`): the proxy cannot read the body.
    Other,
}

/// The coding over every Content-Encoding line and list entry, `identity` (which changes
/// nothing) left out wherever it is. Allocates nothing.
pub fn content_coding(headers: &http::HeaderMap) -> Coding {
    let mut codings = headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
    match (codings.next(), codings.next()) {
        (None, _) => Coding::Identity,
        (Some(c), None) if c.eq_ignore_ascii_case(b"gzip") || c.eq_ignore_ascii_case(b"x-gzip") => {
            Coding::Gzip
        }
        (Some(c), None) if c.eq_ignore_ascii_case(b"deflate") => Coding::Deflate,
        _ => Coding::Other,
    }
}

/// Whether a deflate stream is zlib-wrapped, as HTTP's deflate should be (its first byte names
/// the deflate method, 8), rather than raw, as some senders make it.
pub fn is_zlib(first: Option<u8>) -> bool {
    first.is_some_and(|b| b & 0x0f == 8)
}

/// A request body prefix as the proxy must read it: decoded when the request says it is
/// compressed (`Content-Encoding: gzip` or `deflate`, which Salesforce accepts on requests), to
/// at most `limit` bytes. Returns the bytes and whether they are the whole body. Codings the
/// proxy cannot read (another coding, or several: `gzip, br`) give nothing known: no bytes, not
/// complete.
pub fn decoded_prefix<'a>(
    headers: &http::HeaderMap,
    prefix: &'a [u8],
    complete: bool,
    limit: usize,
) -> (Cow<'a, [u8]>, bool) {
    use flate2::bufread::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
    let decoder: Box<dyn Read + '_> = match content_coding(headers) {
        Coding::Identity => return (Cow::Borrowed(prefix), complete),
        Coding::Gzip => Box::new(MultiGzDecoder::new(prefix)),
        Coding::Deflate if is_zlib(prefix.first().copied()) => Box::new(ZlibDecoder::new(prefix)),
        Coding::Deflate => Box::new(DeflateDecoder::new(prefix)),
        Coding::Other => return (Cow::Borrowed(&[]), false),
    };
    let mut plain = Vec::new();
    // A read error (the prefix ends mid-stream, or is not what it says) keeps what was decoded
    // before it, which is then not the whole body.
    let read = decoder.take(limit as u64 + 1).read_to_end(&mut plain);
    let whole = complete && read.is_ok() && plain.len() <= limit;
    plain.truncate(limit);
    (Cow::Owned(plain), whole)
}

/// How far a request body has gone upstream. The upstream connection's task polls the body;
/// the request's task, waiting for the response, reads this to tell a slow upload (still
/// moving, however long it takes) from a stalled one, and to start the response timeout only
/// once the last byte went out.
#[derive(Debug)]
pub struct Upload {
    start: tokio::time::Instant,
    /// Milliseconds after `start` at which the body last handed a frame on.
    moved_ms: AtomicU64,
    /// The body's length when known (`content-length`): once that much went on, all of it did,
    /// though the end of the stream may come later (an HTTP/2 client's empty last DATA frame)
    /// or never be read (hyper's HTTP/1.1 client stops at the length).
    length: Option<u64>,
    sent: AtomicU64,
    done: AtomicBool,
    /// The client's body broke off (it hung up mid-upload): whatever the upstream connection
    /// then reports, Salesforce never had the whole request.
    broken: AtomicBool,
}

/// Why the wait for a response ended without one.
#[derive(Debug, PartialEq, Eq)]
pub enum Stall {
    /// The body made no progress for the timeout: Salesforce does not have all of it.
    Upload,
    /// The body went out whole and no response came within the timeout of its last byte.
    Response,
}

impl Upload {
    /// `length`: the body's, if known.
    pub fn new(length: Option<u64>) -> Arc<Self> {
        Arc::new(Upload {
            start: tokio::time::Instant::now(),
            moved_ms: AtomicU64::new(0),
            length,
            sent: AtomicU64::new(0),
            // A body of length 0 is whole before hyper (which never polls it) sees it.
            done: AtomicBool::new(length == Some(0)),
            broken: AtomicBool::new(false),
        })
    }

    /// Whether the whole body has been handed on.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    /// Whether the client's body broke off.
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// The body handed on a frame of `bytes` data; `ended`: and says it is over.
    fn moved(&self, bytes: u64, ended: bool) {
        let ms = self.start.elapsed().as_millis() as u64;
        // Relaxed: the waiter only needs to see some recent value; a stale one makes it sleep
        // once more, never fire early.
        self.moved_ms.store(ms, Ordering::Relaxed);
        let sent = self.sent.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if ended || self.length.is_some_and(|length| sent >= length) {
            self.done.store(true, Ordering::Relaxed);
        }
    }

    /// Resolves once the body has not moved for `timeout`.
    pub async fn stalled(&self, timeout: Duration) -> Stall {
        loop {
            let moved = self.moved_ms.load(Ordering::Relaxed);
            tokio::time::sleep_until(self.start + Duration::from_millis(moved) + timeout).await;
            if self.moved_ms.load(Ordering::Relaxed) == moved {
                return if self.done.load(Ordering::Relaxed) {
                    Stall::Response
                } else {
                    Stall::Upload
                };
            }
        }
    }
}

impl RequestBody {
    /// A body the proxy holds whole (a deferred call being replayed).
    pub fn full(data: Bytes) -> Self {
        RequestBody::Prefixed {
            prefix: Some(data),
            rest: None,
            trailers: None,
            held: Held::default(),
        }
    }

    /// Reads the whole body to hold it, or gives up past `limit` bytes, at trailers, when
    /// `budget` is spent, or when no byte came for `stall`.
    pub async fn collect_limited(
        mut self,
        limit: usize,
        stall: Duration,
        budget: &'static HeldBudget,
    ) -> Result<Collected, ProxyError> {
        let mut buf = bytes::BytesMut::new();
        let mut held = budget.account();
        while let Some(frame) = next_frame(&mut self, stall).await? {
            match frame.into_data() {
                Ok(data) if buf.len() + data.len() > limit => return Ok(Collected::TooLarge),
                Ok(data) if !held.grow(data.len()) => return Ok(Collected::Busy),
                Ok(data) => buf.extend_from_slice(&data),
                Err(_) => return Ok(Collected::Trailers),
            }
        }
        Ok(Collected::Whole(buf.freeze()))
    }
    /// Reads up to `limit` bytes of `body` so the call can be classified, and returns them with
    /// a body that replays them before the rest (and the trailers, should they end it). `complete`
    /// is true when the whole body fit. Reading stops early, the prefix then not complete, once
    /// `budget` is spent. A client whose body makes no progress for `stall` gets the upload's
    /// 408.
    pub async fn read_prefix(
        mut body: Incoming,
        limit: usize,
        stall: Duration,
        budget: &'static HeldBudget,
    ) -> Result<(Bytes, bool, RequestBody), ProxyError> {
        let mut buf = bytes::BytesMut::new();
        let mut held = budget.account();
        let mut room = true;
        let (rest, trailers) = loop {
            // A body of known length may have ended with the frame just read.
            if body.is_end_stream() {
                break (None, None);
            }
            if buf.len() >= limit || !room {
                break (Some(body), None);
            }
            match next_frame(&mut body, stall).await? {
                None => break (None, None),
                Some(frame) => match frame.into_data() {
                    Ok(data) => {
                        room = held.grow(data.len());
                        buf.extend_from_slice(&data);
                    }
                    // Trailers are a body's last frame.
                    Err(frame) => break (None, frame.into_trailers().ok().map(Box::new)),
                },
            }
        };
        let prefix = buf.freeze();
        let complete = rest.is_none();
        let body = RequestBody::Prefixed {
            prefix: Some(prefix.clone()),
            rest,
            trailers,
            held,
        };
        Ok((prefix, complete, body))
    }

    /// Whether the body ends with trailers the proxy has already read, which only a chunked
    /// message can carry on.
    pub fn has_read_trailers(&self) -> bool {
        match self {
            RequestBody::Prefixed { trailers, .. } => trailers.is_some(),
            RequestBody::Tracked(inner, _) => inner.has_read_trailers(),
            RequestBody::Stream(_) | RequestBody::Empty => false,
        }
    }
}

/// The next frame of a body the proxy reads itself, unless the client sends nothing for
/// `stall` (as an upload forwarded as it comes would time out).
async fn next_frame<B>(body: &mut B, stall: Duration) -> Result<Option<Frame<Bytes>>, ProxyError>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    match tokio::time::timeout(stall, body.frame()).await {
        Ok(None) => Ok(None),
        Ok(Some(frame)) => frame.map(Some).map_err(ProxyError::ClientBody),
        Err(_) => Err(ProxyError::UploadStalled { after: stall }),
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Stream(inner) => Pin::new(inner).poll_frame(cx),
            RequestBody::Prefixed {
                prefix,
                rest,
                trailers,
                held,
            } => {
                if let Some(data) = prefix.take() {
                    // Handed on: the connection's buffers hold it from here.
                    *held = Held::default();
                    if !data.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                match rest {
                    Some(inner) => Pin::new(inner).poll_frame(cx),
                    None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t)))),
                }
            }
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Tracked(inner, upload) => {
                let polled = Pin::new(inner.as_mut()).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        let bytes = frame.data_ref().map_or(0, |data| data.len() as u64);
                        upload.moved(bytes, inner.is_end_stream())
                    }
                    Poll::Ready(None) => upload.moved(0, true),
                    Poll::Ready(Some(Err(_))) => upload.broken.store(true, Ordering::Relaxed),
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(inner) => inner.is_end_stream(),
            RequestBody::Prefixed {
                prefix,
                rest,
                trailers,
                ..
            } => {
                prefix.as_ref().is_none_or(Bytes::is_empty)
                    && rest.as_ref().is_none_or(Body::is_end_stream)
                    && trailers.is_none()
            }
            RequestBody::Empty => true,
            RequestBody::Tracked(inner, _) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(inner) => inner.size_hint(),
            RequestBody::Prefixed {
                prefix,
                rest,
                trailers,
                ..
            } => {
                let rest = match (rest, trailers) {
                    (Some(rest), _) => rest.size_hint(),
                    // Not exact: a length would frame the message without its trailers.
                    (None, Some(_)) => SizeHint::new(),
                    (None, None) => SizeHint::with_exact(0),
                };
                plus_prefix(rest, prefix.as_ref())
            }
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Tracked(inner, _) => inner.size_hint(),
        }
    }
}

/// The size of a body that replays `prefix` before a stream of size `rest`.
fn plus_prefix(rest: SizeHint, prefix: Option<&Bytes>) -> SizeHint {
    let head = prefix.map_or(0, |p| p.len() as u64);
    let mut hint = SizeHint::new();
    // Upper first: `set_lower` refuses a lower bound above the current upper one.
    if let Some(upper) = rest.upper() {
        hint.set_upper(upper + head);
    }
    hint.set_lower(rest.lower() + head);
    hint
}

/// Something that wants to see the start of a response body as it streams past.
pub trait Observer: Send + Unpin + 'static {
    /// Called with each data chunk until it returns `false` (seen enough).
    fn chunk(&mut self, data: &[u8]) -> bool;
    /// Called once when the body ended or was dropped.
    fn finish(&mut self);
}

/// A response body on its way back to the client.
pub enum ResponseBody {
    Stream(UpstreamBody),
    /// Bytes already read from the upstream body, then the rest of it.
    Prefixed(Option<Bytes>, UpstreamBody),
    /// The upstream body, shown to an observer as it passes.
    Observed(Observed),
    /// A body the proxy made or rewrote.
    Full(Option<Bytes>),
    /// A body that keeps something until it is done (or dropped): the `max_in_flight` slots
    /// its call holds, an HTTP/2 stream's mark that its connection is in use (`listener.rs`).
    Kept(Box<ResponseBody>, Box<dyn std::any::Any + Send + Sync>),
}

impl ResponseBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        ResponseBody::Full(Some(data.into()))
    }

    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }

    /// The answer to a `HEAD`: `resp` as a `GET` gets it, without the body (RFC 9110 §9.3.2)
    /// but with the length that body has in `Content-Length`. For the answers callmeter makes
    /// itself (the admin listener, a deferred call's status URL): hyper leaves the body out
    /// over HTTP/1.1, but over HTTP/2 it would send it.
    pub fn head_only(resp: http::Response<ResponseBody>) -> http::Response<ResponseBody> {
        let (mut parts, body) = resp.into_parts();
        if let Some(len) = body.size_hint().exact() {
            parts
                .headers
                .entry(http::header::CONTENT_LENGTH)
                .or_insert_with(|| http::HeaderValue::from(len));
        }
        http::Response::from_parts(parts, ResponseBody::empty())
    }

    /// Keeps the call's in-flight slots until this body is sent (no-op when it holds none).
    pub fn hold(self, in_flight: crate::meter::InFlight) -> Self {
        if in_flight.is_empty() {
            self
        } else {
            self.keep(in_flight)
        }
    }

    /// Keeps `guard` until this body is sent (or dropped).
    pub fn keep(self, guard: impl std::any::Any + Send + Sync) -> Self {
        ResponseBody::Kept(Box::new(self), Box::new(guard))
    }

    pub fn observed(inner: UpstreamBody, observer: Box<dyn Observer>) -> Self {
        ResponseBody::Observed(Observed {
            inner,
            observer: Some(observer),
        })
    }

    /// Collects up to `limit` bytes of a response body; when the body is larger, `Err` carries
    /// what was read plus the rest of the stream, so nothing is lost.
    pub async fn collect_bounded(
        mut inner: UpstreamBody,
        limit: usize,
    ) -> Result<Result<Bytes, ResponseBody>, BodyError> {
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = inner.frame().await {
            if let Ok(data) = frame?.into_data() {
                buf.extend_from_slice(&data);
            }
            if buf.len() > limit {
                return Ok(Err(ResponseBody::Prefixed(Some(buf.freeze()), inner)));
            }
        }
        Ok(Ok(buf.freeze()))
    }
}

/// An upstream body and the observer that sees it pass.
pub struct Observed {
    inner: UpstreamBody,
    observer: Option<Box<dyn Observer>>,
}

impl Observed {
    fn finish(&mut self) {
        if let Some(mut obs) = self.observer.take() {
            obs.finish();
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // A client that hangs up mid-body still lets the observer report what it saw.
        self.finish();
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Stream(inner) => Pin::new(inner).poll_frame(cx),
            ResponseBody::Prefixed(prefix, inner) => match prefix.take() {
                Some(data) if !data.is_empty() => Poll::Ready(Some(Ok(Frame::data(data)))),
                _ => Pin::new(inner).poll_frame(cx),
            },
            ResponseBody::Observed(observed) => {
                let polled = Pin::new(&mut observed.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(data), Some(obs)) =
                            (frame.data_ref(), observed.observer.as_mut())
                        {
                            if !obs.chunk(data) {
                                observed.finish();
                            }
                        }
                    }
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => observed.finish(),
                    Poll::Pending => {}
                }
                polled
            }
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Kept(inner, _) => Pin::new(inner.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Stream(inner) | ResponseBody::Observed(Observed { inner, .. }) => {
                inner.is_end_stream()
            }
            ResponseBody::Prefixed(prefix, inner) => {
                prefix.as_ref().is_none_or(Bytes::is_empty) && inner.is_end_stream()
            }
            ResponseBody::Full(data) => data.is_none(),
            ResponseBody::Kept(inner, _) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Stream(inner) | ResponseBody::Observed(Observed { inner, .. }) => {
                inner.size_hint()
            }
            ResponseBody::Prefixed(prefix, inner) => {
                plus_prefix(inner.size_hint(), prefix.as_ref())
            }
            ResponseBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseBody::Kept(inner, _) => inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use http::HeaderValue;

    use super::*;

    const PLAIN: &[u8] = br#"{"batchRequests":[{"method":"GET","url":"v62.0/limits"}]}"#;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(bytes).expect("compress");
        e.finish().expect("compress")
    }

    fn decode(coding: &str, bytes: &[u8], complete: bool, limit: usize) -> (Vec<u8>, bool) {
        let mut headers = http::HeaderMap::new();
        for line in coding.split('|') {
            let value = HeaderValue::from_str(line).expect("header");
            headers.append(http::header::CONTENT_ENCODING, value);
        }
        let (plain, whole) = decoded_prefix(&headers, bytes, complete, limit);
        (plain.into_owned(), whole)
    }

    #[test]
    fn gzip_and_both_deflates_are_decoded() {
        assert_eq!(
            decode("gzip", &gzip(PLAIN), true, 1024),
            (PLAIN.to_vec(), true)
        );
        assert_eq!(decode(" GZIP ", &gzip(PLAIN), true, 1024).0, PLAIN);
        let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
        zlib.write_all(PLAIN).expect("compress");
        let zlib = zlib.finish().expect("compress");
        assert_eq!(decode("deflate", &zlib, true, 1024), (PLAIN.to_vec(), true));
        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(PLAIN).expect("compress");
        let raw = raw.finish().expect("compress");
        assert_eq!(decode("deflate", &raw, true, 1024), (PLAIN.to_vec(), true));
    }

    #[test]
    fn plain_bodies_are_borrowed_as_they_are() {
        let (bytes, whole) = decoded_prefix(&http::HeaderMap::new(), PLAIN, false, 1024);
        assert!(matches!(bytes, Cow::Borrowed(b) if b == PLAIN) && !whole);
        assert_eq!(
            decode("identity", PLAIN, true, 1024),
            (PLAIN.to_vec(), true)
        );
    }

    /// `identity` changes nothing wherever it is named; two real codings are not read.
    #[test]
    fn codings_are_read_over_every_header_line() {
        let zipped = gzip(PLAIN);
        for coding in ["identity|gzip", "gzip, identity", " , gzip"] {
            assert_eq!(
                decode(coding, &zipped, true, 1024),
                (PLAIN.to_vec(), true),
                "{coding}"
            );
        }
        for coding in ["gzip|gzip", "gzip, br", "br|gzip"] {
            assert_eq!(
                decode(coding, &zipped, true, 1024),
                (Vec::new(), false),
                "{coding}"
            );
        }
    }

    /// A cut prefix, a body that expands past the limit (a compression bomb stops there), a
    /// body that is not what its coding says, and a coding the proxy cannot read: never the
    /// whole body.
    #[test]
    fn what_cannot_be_decoded_whole_is_not_complete() {
        let zipped = gzip(PLAIN);
        let (cut, whole) = decode("gzip", &zipped[..zipped.len() / 2], false, 1024);
        assert!(!whole && PLAIN.starts_with(&cut));
        let bomb = gzip(&vec![b'{'; 1 << 20]);
        let (bytes, whole) = decode("gzip", &bomb, true, 4096);
        assert_eq!((bytes.len(), whole), (4096, false));
        assert!(!decode("gzip", PLAIN, true, 1024).1);
        assert_eq!(decode("br", PLAIN, true, 1024), (Vec::new(), false));
    }

    /// Bytes held are given back when their holder is dropped; past the cap a holder is told
    /// to read no more, and a body read to be stored is refused as `Busy` (not `TooLarge`:
    /// it would fit once others are done).
    #[tokio::test]
    async fn held_bytes_are_bounded_over_all_holders() {
        static SMALL: HeldBudget = HeldBudget::new(100);
        let mut first = SMALL.account();
        assert!(first.grow(60));
        let mut second = SMALL.account();
        assert!(second.grow(40), "at the cap is within it");
        assert!(!second.grow(1), "past it");
        assert_eq!(SMALL.held(), 101, "what was read is held all the same");
        drop(second);
        assert_eq!(SMALL.held(), 60);
        let stall = Duration::from_secs(1);
        let body = RequestBody::full(Bytes::from(vec![b'x'; 50]));
        let collected = body.collect_limited(1_000, stall, &SMALL).await;
        assert!(matches!(collected, Ok(Collected::Busy)), "{collected:?}");
        assert_eq!(SMALL.held(), 60, "the refused read gave its bytes back");
        drop(first);
        let body = RequestBody::full(Bytes::from(vec![b'x'; 50]));
        let collected = body.collect_limited(1_000, stall, &SMALL).await;
        assert!(matches!(collected, Ok(Collected::Whole(b)) if b.len() == 50));
        assert_eq!(SMALL.held(), 0);
    }
}

/// Held bytes over real request bodies (from a hyper server over an in-memory pipe): given back
/// on every way a read ends, and a whole body read past the budget costed as read whole.
#[cfg(test)]
mod held_tests {
    use std::time::Duration;

    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A real `Incoming` from a hyper HTTP/1.1 server over an in-memory pipe: the request
    /// head and `first` are written at once; the returned writer sends the rest (or is
    /// dropped to hang up). The service never answers, so the body stays the test's.
    async fn incoming(content_length: usize, first: &[u8]) -> (Incoming, tokio::io::DuplexStream) {
        let (mut client, server) = tokio::io::duplex(4 << 20);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(req.into_body());
                    std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
                        .await
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), svc)
                .await;
        });
        let head = format!(
            "POST /services/data/v62.0/composite/batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {content_length}\r\n\r\n"
        );
        client.write_all(head.as_bytes()).await.expect("head");
        client.write_all(first).await.expect("first bytes");
        (rx.recv().await.expect("request"), client)
    }

    const STALL: Duration = Duration::from_secs(30);

    /// Every way a read can end early gives its bytes back: a `read_prefix` future dropped
    /// mid-read, a read that stalls, a prefixed body dropped before it is polled, a deferred
    /// `collect_limited` dropped mid-read, a client that hangs up mid-body.
    #[tokio::test]
    async fn held_bytes_return_to_zero_on_every_early_end() {
        static HELD_BYTES: HeldBudget = HeldBudget::new(64 << 20);
        // 1. read_prefix dropped while it waits for more.
        let (body, _w) = incoming(100_000, &[b'x'; 10_000]).await;
        let r = tokio::time::timeout(
            Duration::from_millis(200),
            RequestBody::read_prefix(body, 1 << 20, STALL, &HELD_BYTES),
        )
        .await;
        assert!(r.is_err(), "still reading");
        assert_eq!(HELD_BYTES.held(), 0, "read_prefix dropped mid-read");
        // 2. read_prefix that stalls.
        let (body, _w) = incoming(100_000, &[b'x'; 10_000]).await;
        let r =
            RequestBody::read_prefix(body, 1 << 20, Duration::from_millis(100), &HELD_BYTES).await;
        assert!(matches!(r, Err(ProxyError::UploadStalled { .. })));
        assert_eq!(HELD_BYTES.held(), 0, "stalled read");
        // 3. a client hanging up mid-body.
        let (body, w) = incoming(100_000, &[b'x'; 10_000]).await;
        let reading = tokio::spawn(RequestBody::read_prefix(body, 1 << 20, STALL, &HELD_BYTES));
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(w);
        let r = reading.await.expect("task");
        assert!(r.is_err(), "the body broke");
        assert_eq!(HELD_BYTES.held(), 0, "client hung up");
        // 4. a prefix read (limit reached), its body dropped without being polled.
        let (body, _w) = incoming(100_000, &[b'x'; 50_000]).await;
        let (_, complete, prefixed) = RequestBody::read_prefix(body, 20_000, STALL, &HELD_BYTES)
            .await
            .expect("prefix");
        assert!(!complete);
        assert!(HELD_BYTES.held() > 0, "the prefix is held");
        drop(prefixed);
        assert_eq!(HELD_BYTES.held(), 0, "prefixed body dropped unpolled");
        // 5. the deferred path: a prefixed body collected, dropped mid-read.
        let (body, _w) = incoming(100_000, &[b'x'; 50_000]).await;
        let (_, _, prefixed) = RequestBody::read_prefix(body, 20_000, STALL, &HELD_BYTES)
            .await
            .expect("prefix");
        let r = tokio::time::timeout(
            Duration::from_millis(200),
            prefixed.collect_limited(1 << 20, STALL, &HELD_BYTES),
        )
        .await;
        assert!(r.is_err(), "still collecting");
        assert_eq!(HELD_BYTES.held(), 0, "collect_limited dropped mid-read");
    }

    /// Once the budget is spent, a body that arrived whole in its first frame is costed as
    /// read whole: read_prefix stopped after that frame without learning that the stream had
    /// ended, and a 2-entry Composite Batch counted 25 calls against its quota and the org.
    #[tokio::test]
    async fn a_whole_body_read_past_the_budget_is_costed_whole() {
        static HELD_BYTES: HeldBudget = HeldBudget::new(64 << 20);
        let mut attacker = HELD_BYTES.account();
        attacker.grow(64 << 20); // e.g. 64 trickling 1 MiB SOAP / batch prefixes
        let batch = br#"{"batchRequests":[{"method":"GET","url":"v62.0/limits"},{"method":"GET","url":"v62.0/limits"}]}"#;
        let (body, _w) = incoming(batch.len(), batch).await;
        let (prefix, complete, _body) = RequestBody::read_prefix(body, 1 << 20, STALL, &HELD_BYTES)
            .await
            .expect("prefix");
        assert_eq!(&prefix[..], &batch[..], "the whole body was read");
        let units = crate::salesforce::counted_units(
            crate::salesforce::CallKind::CompositeBatch,
            &crate::salesforce::CountingRules::default(),
            Some(crate::salesforce::BodyPrefix {
                bytes: &prefix,
                complete,
            }),
        );
        drop(attacker);
        assert_eq!(
            (complete, units),
            (true, 2),
            "a batch of 2, read whole, counts 2"
        );
    }
}
