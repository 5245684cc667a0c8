//! The probe's side of HTTP/1.1, written out: one GET and its whole answer, read in the
//! probe's own task into a buffer the size of the answer. A general client (hyper's) spends a
//! driver task, a channel and two 8 KiB buffers on every connection; a probe needs none of
//! them, and at a thousand clusters those were a large share of the operator's memory (a
//! kept connection held about 20 KiB) and of its CPU (a task and its wake-ups per probe).
//!
//! Only what a health answer can use is read: a status line, headers, and a body framed by
//! `Content-Length`, by chunked transfer coding, or by the end of the connection. Anything
//! else is an error that says what came back; it never turns into a health report.

use std::net::IpAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The largest head (status line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Headers read from one answer; more is an error.
const MAX_HEADERS: usize = 64;

/// A connection to a pod, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One answer, whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// Whether the connection may carry the next request: HTTP/1.1, not closed by the
    /// answer, and nothing sent beyond it.
    pub reusable: bool,
}

/// Why no answer was read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The connection ended, failed or was reset before a whole answer.
    #[error("{0}")]
    Broken(String),
    /// What came back is not an HTTP/1.x answer this reader takes, or it is too large.
    #[error("{0}")]
    Malformed(String),
}

/// The request, every byte of it: a fixed GET with no credentials.
pub fn request(path: &str, ip: IpAddr, port: u16) -> Result<Vec<u8>, String> {
    // The path is the user's; only a valid origin-form target may reach the wire, so no
    // header can be smuggled in through it.
    let target =
        http::uri::PathAndQuery::try_from(path).map_err(|e| format!("path {path:?}: {e}"))?;
    if !target.as_str().starts_with('/') {
        return Err(format!("path {path:?}: must start with /"));
    }
    let host = match ip {
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        IpAddr::V4(ip) => format!("{ip}:{port}"),
    };
    Ok(format!(
        "GET {target} HTTP/1.1\r\nhost: {host}\r\naccept: application/json\r\nuser-agent: vault-registrar/{}\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes())
}

impl Stream {
    /// Whether an idle connection may be used again: the pod has not closed it, and has
    /// sent nothing unasked. A TLS connection is not looked into (records the TLS layer
    /// would read, such as session tickets, are no sign of anything); a reuse that breaks
    /// is retried on a fresh connection anyway.
    pub fn idle_and_open(&self) -> bool {
        match self {
            Stream::Plain(tcp) => {
                let mut byte = [0u8; 1];
                matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
            Stream::Tls(_) => true,
        }
    }

    /// Sends `request` and reads its whole answer, at most `max_body` bytes of body.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        max_body: usize,
    ) -> Result<Answer, ExchangeError> {
        match self {
            Stream::Plain(tcp) => exchange(tcp, request, max_body).await,
            Stream::Tls(tls) => exchange(tls.as_mut(), request, max_body).await,
        }
    }
}

/// Sends the request and reads the answer on any stream.
pub async fn exchange<S>(
    stream: &mut S,
    request: &[u8],
    max_body: usize,
) -> Result<Answer, ExchangeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(request).await.map_err(broken("send"))?;
    stream.flush().await.map_err(broken("send"))?;
    let mut reader = Reader {
        stream,
        buf: Vec::with_capacity(1024),
        at: 0,
        limit: read_limit(max_body),
    };
    let head = loop {
        let head = reader.head().await?;
        // An interim answer (100 Continue and the like) comes before the real one.
        if !(100..200).contains(&head.status) {
            break head;
        }
        if head.status == 101 {
            return Err(ExchangeError::Malformed(
                "status 101: the pod switched protocols".into(),
            ));
        }
    };
    let (body, framed) = match head.framing {
        Framing::None => (Vec::new(), true),
        Framing::Length(n) if n > max_body => {
            return Err(too_large(head.status, max_body));
        }
        Framing::Length(n) => (reader.exact(n).await?, true),
        Framing::Chunked => (reader.chunked(head.status, max_body).await?, true),
        Framing::UntilClose => (reader.until_close(head.status, max_body).await?, false),
    };
    Ok(Answer {
        status: head.status,
        body,
        reusable: framed && head.keep_alive && reader.at == reader.buf.len(),
    })
}

fn broken(what: &'static str) -> impl Fn(std::io::Error) -> ExchangeError {
    move |e| ExchangeError::Broken(format!("{what}: {e}"))
}

fn too_large(status: u16, max_body: usize) -> ExchangeError {
    ExchangeError::Malformed(format!(
        "status {status}: body larger than {max_body} bytes"
    ))
}

/// How the body's end is known.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// No body (204, 304, and interim answers).
    None,
    Length(usize),
    Chunked,
    /// Read until the pod closes; the connection cannot be reused.
    UntilClose,
}

#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    framing: Framing,
    keep_alive: bool,
}

/// The most one exchange reads, whatever the framing: interim answers, trailers and chunk
/// sizes are each bounded only per piece, and a pod could send them without end.
fn read_limit(max_body: usize) -> usize {
    4 * (MAX_HEAD + max_body)
}

/// Bytes read so far and how far they are used.
struct Reader<'a, S> {
    stream: &'a mut S,
    buf: Vec<u8>,
    at: usize,
    limit: usize,
}

impl<S: AsyncRead + Unpin> Reader<'_, S> {
    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> Result<bool, ExchangeError> {
        if self.buf.len() >= self.limit {
            return Err(ExchangeError::Malformed(format!(
                "answer larger than {} bytes in all",
                self.limit
            )));
        }
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(self.buf.len().max(1024));
        }
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(broken("read"))?;
        Ok(n > 0)
    }

    async fn fill_or(&mut self, what: &str) -> Result<(), ExchangeError> {
        match self.fill().await? {
            true => Ok(()),
            false => Err(ExchangeError::Broken(format!("connection closed {what}"))),
        }
    }

    async fn head(&mut self) -> Result<Head, ExchangeError> {
        loop {
            if let Some((used, head)) = parse_head(&self.buf[self.at..])? {
                self.at += used;
                return Ok(head);
            }
            if self.buf.len() - self.at > MAX_HEAD {
                return Err(ExchangeError::Malformed(format!(
                    "answer's head larger than {MAX_HEAD} bytes"
                )));
            }
            let what = match self.buf.len() == self.at {
                true => "before an answer",
                false => "in the middle of the answer's head",
            };
            self.fill_or(what).await?;
        }
    }

    /// The next `n` bytes.
    async fn exact(&mut self, n: usize) -> Result<Vec<u8>, ExchangeError> {
        while self.buf.len() - self.at < n {
            self.fill_or("in the middle of the body").await?;
        }
        let body = self.buf[self.at..self.at + n].to_vec();
        self.at += n;
        Ok(body)
    }

    /// Everything up to the end of the stream.
    async fn until_close(
        &mut self,
        status: u16,
        max_body: usize,
    ) -> Result<Vec<u8>, ExchangeError> {
        // Checked before each read: the head's read may have brought the whole body.
        loop {
            if self.buf.len() - self.at > max_body {
                return Err(too_large(status, max_body));
            }
            if !self.fill().await? {
                break;
            }
        }
        let body = self.buf[self.at..].to_vec();
        self.at = self.buf.len();
        Ok(body)
    }

    /// A chunked body, its trailers read and dropped.
    async fn chunked(&mut self, status: u16, max_body: usize) -> Result<Vec<u8>, ExchangeError> {
        let mut body = Vec::new();
        loop {
            let size = loop {
                match httparse::parse_chunk_size(&self.buf[self.at..]) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        self.at += used;
                        break size;
                    }
                    Ok(httparse::Status::Partial) => {
                        self.fill_or("in the middle of a chunk's size").await?
                    }
                    Err(_) => {
                        return Err(ExchangeError::Malformed(format!(
                            "status {status}: bad chunk size"
                        )));
                    }
                }
            };
            if size == 0 {
                self.trailers(status).await?;
                return Ok(body);
            }
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if size > max_body.saturating_sub(body.len()) {
                return Err(too_large(status, max_body));
            }
            let chunk = self.exact(size).await?;
            body.extend_from_slice(&chunk);
            let end = self.exact(2).await?;
            if end != b"\r\n" {
                return Err(ExchangeError::Malformed(format!(
                    "status {status}: a chunk does not end with CRLF"
                )));
            }
        }
    }

    /// Trailer lines up to the empty one.
    async fn trailers(&mut self, status: u16) -> Result<(), ExchangeError> {
        loop {
            let rest = &self.buf[self.at..];
            match rest.windows(2).position(|w| w == b"\r\n") {
                Some(0) => {
                    self.at += 2;
                    return Ok(());
                }
                Some(end) => self.at += end + 2,
                None if rest.len() > MAX_HEAD => {
                    return Err(ExchangeError::Malformed(format!(
                        "status {status}: trailers larger than {MAX_HEAD} bytes"
                    )));
                }
                None => self.fill_or("in the middle of the trailers").await?,
            }
        }
    }
}

/// The answer's head, if `bytes` hold all of it, and how many bytes it took.
fn parse_head(bytes: &[u8]) -> Result<Option<(usize, Head)>, ExchangeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let used = match response.parse(bytes) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(ExchangeError::Malformed(format!(
                "not an HTTP/1.x answer: {e}"
            )));
        }
    };
    let status = response.code.unwrap_or_default();
    // Three digits are all the parser checks; a status below 100 does not exist.
    if status < 100 {
        return Err(ExchangeError::Malformed(format!(
            "status {status:03} is not an HTTP status"
        )));
    }
    let mut length: Option<usize> = None;
    let mut chunked = None;
    let mut close = response.version != Some(1);
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let n = value.parse::<usize>().map_err(|_| {
                let value = crate::text::excerpt(value, crate::text::EXCERPT);
                ExchangeError::Malformed(format!("status {status}: bad Content-Length {value}"))
            })?;
            if length.is_some_and(|m| m != n) {
                return Err(ExchangeError::Malformed(format!(
                    "status {status}: two different Content-Lengths"
                )));
            }
            length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding frames the body.
            let last = value.rsplit(',').next().unwrap_or("").trim();
            chunked = Some(last.eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            close |= value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"));
        }
    }
    let framing = match (status, chunked, length) {
        (100..=199 | 204 | 304, _, _) => Framing::None,
        // Transfer-Encoding outranks Content-Length (RFC 9112, 6.3).
        (_, Some(true), _) => Framing::Chunked,
        (_, Some(false), _) => Framing::UntilClose,
        (_, None, Some(n)) => Framing::Length(n),
        (_, None, None) => Framing::UntilClose,
    };
    let keep_alive = !close && !matches!(framing, Framing::UntilClose);
    Ok(Some((
        used,
        Head {
            status,
            framing,
            keep_alive,
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the answer in `pieces` (each one read), as a pod on a slow network sends it.
    async fn answer_to(pieces: Vec<Vec<u8>>, max_body: usize) -> Result<Answer, ExchangeError> {
        let (mut near, mut far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut request = [0u8; 64];
            let _ = far.read(&mut request).await;
            for piece in pieces {
                far.write_all(&piece).await.unwrap();
                far.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        exchange(&mut near, b"GET / HTTP/1.1\r\n\r\n", max_body).await
    }

    fn pieces(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    const BODY: &[u8] = br#"{"initialized":true,"sealed":false,"standby":false}"#;

    fn ok(body: &[u8], reusable: bool) -> Result<Answer, ExchangeError> {
        Ok(Answer {
            status: 200,
            body: body.to_vec(),
            reusable,
        })
    }

    #[tokio::test]
    async fn answers_are_read_whole_whatever_their_framing() {
        let length = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", BODY.len());
        let head = length.as_bytes();
        let http10 = length.replace("1.1", "1.0");
        let close = length.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
        let cases = vec![
            ("length, one piece", pieces(&[&[head, BODY].concat()]), ok(BODY, true)),
            ("length, head split", pieces(&[&head[..7], &head[7..], BODY]), ok(BODY, true)),
            ("length, body split", pieces(&[head, &BODY[..5], &BODY[5..]]), ok(BODY, true)),
            (
                "chunked, with an extension and a trailer",
                pieces(&[
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\n{\"ini\r\n",
                    b"2e\r\ntialized\":true,\"sealed\":false,\"standby\":false}\r\n0\r\nX-T: 1\r\n\r\n",
                ]),
                ok(BODY, true),
            ),
            ("until close", pieces(&[b"HTTP/1.1 200 OK\r\n\r\n", BODY]), ok(BODY, false)),
            ("HTTP/1.0", pieces(&[http10.as_bytes(), BODY]), ok(BODY, false)),
            ("connection: close", pieces(&[close.as_bytes(), BODY]), ok(BODY, false)),
            (
                "bytes beyond the answer",
                pieces(&[&[head, BODY, b"HTTP/1.1 200 OK"].concat()]),
                ok(BODY, false),
            ),
            (
                "an interim answer first",
                pieces(&[b"HTTP/1.1 100 Continue\r\n\r\n", head, BODY]),
                ok(BODY, true),
            ),
            (
                "204 has no body",
                pieces(&[b"HTTP/1.1 204 No Content\r\n\r\n"]),
                Ok(Answer {
                    status: 204,
                    body: vec![],
                    reusable: true,
                }),
            ),
        ];
        for (name, pieces, want) in cases {
            assert_eq!(answer_to(pieces, 1024).await, want, "{name}");
        }
    }

    #[tokio::test]
    async fn what_is_not_a_whole_answer_says_so() {
        let broken = |what: &str| Err::<Answer, _>(ExchangeError::Broken(what.into()));
        let malformed = |what: &str| Err::<Answer, _>(ExchangeError::Malformed(what.into()));
        let too_large = malformed("status 200: body larger than 1024 bytes");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let cases = vec![
            (
                "nothing",
                pieces(&[]),
                broken("connection closed before an answer"),
            ),
            (
                "half a head",
                pieces(&[b"HTTP/1.1 200 OK\r\nContent-"]),
                broken("connection closed in the middle of the answer's head"),
            ),
            (
                "half a body",
                pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"]),
                broken("connection closed in the middle of the body"),
            ),
            (
                "not HTTP",
                pieces(&[b"SSH-2.0-OpenSSH_9.6\r\n"]),
                malformed("not an HTTP/1.x answer: invalid HTTP version"),
            ),
            (
                "a body too large",
                pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n"]),
                too_large.clone(),
            ),
            (
                "until close, too large",
                pieces(&[b"HTTP/1.1 200 OK\r\n\r\n", &[b'x'; 1500]]),
                too_large.clone(),
            ),
            (
                "until close, too large in the head's read",
                pieces(&[&[b"HTTP/1.1 200 OK\r\n\r\n".as_slice(), &[b'x'; 1500]].concat()]),
                too_large.clone(),
            ),
            (
                "chunks too large",
                pieces(&[chunked, b"fffff\r\n"]),
                too_large,
            ),
            (
                "a bad chunk size",
                pieces(&[chunked, b"zz\r\n"]),
                malformed("status 200: bad chunk size"),
            ),
            (
                "a chunk without its CRLF",
                pieces(&[chunked, b"2\r\n{}xx0\r\n\r\n"]),
                malformed("status 200: a chunk does not end with CRLF"),
            ),
            (
                "a bad length",
                pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"]),
                malformed("status 200: bad Content-Length -1"),
            ),
            (
                "two lengths",
                pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"]),
                malformed("status 200: two different Content-Lengths"),
            ),
            (
                "a status below 100",
                pieces(&[b"HTTP/1.1 080 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"]),
                malformed("status 080 is not an HTTP status"),
            ),
            (
                "switching protocols",
                pieces(&[b"HTTP/1.1 101 Switching Protocols\r\n\r\n"]),
                malformed("status 101: the pod switched protocols"),
            ),
        ];
        for (name, pieces, want) in cases {
            assert_eq!(answer_to(pieces, 1024).await, want, "{name}");
        }
    }

    #[tokio::test]
    async fn endless_interim_answers_or_trailers_are_refused() {
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(3000);
        let trailers = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".as_slice(),
            &b"X-T: 1\r\n".repeat(10_000),
        ]
        .concat();
        let want = Err(ExchangeError::Malformed(format!(
            "answer larger than {} bytes in all",
            read_limit(1024)
        )));
        for (name, bytes) in [("interim answers", interim), ("trailers", trailers)] {
            assert_eq!(answer_to(vec![bytes], 1024).await, want, "{name}");
        }
    }

    #[tokio::test]
    async fn an_endless_head_is_refused() {
        let header = b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        let mut parts = pieces(&[b"HTTP/1.1 200 OK\r\n"]);
        parts.extend(std::iter::repeat_n(header.to_vec(), 400));
        let got = answer_to(parts, 1024).await;
        assert!(matches!(got, Err(ExchangeError::Malformed(_))), "{got:?}");
    }

    #[test]
    fn the_request_is_a_plain_get_and_the_path_cannot_add_headers() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let got =
            String::from_utf8(request("/v1/sys/health?standbyok=true", ip, 8200).unwrap()).unwrap();
        assert!(
            got.starts_with(
                "GET /v1/sys/health?standbyok=true HTTP/1.1\r\nhost: 10.0.0.7:8200\r\n"
            ),
            "{got}"
        );
        assert!(got.ends_with("\r\n\r\n"));
        let v6 =
            String::from_utf8(request("/h", "fd00::1".parse().unwrap(), 8200).unwrap()).unwrap();
        assert!(v6.contains("host: [fd00::1]:8200\r\n"), "{v6}");
        for bad in ["/x\r\nX-Evil: 1", "/a b", "v1/sys/health", ""] {
            assert!(request(bad, ip, 8200).is_err(), "{bad:?}");
        }
    }
}
