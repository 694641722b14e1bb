//! Where a plain HTTP/1 connection stands, followed from the bytes the
//! service reads (requests) and writes (responses). It can go back to portmux
//! only at rest: every request read has had its final response written in
//! full, nothing of a next request has been read, and neither side asked to
//! close or switched protocols. Heads are parsed with `httparse`; bodies are
//! followed by their framing (Content-Length, chunked), so a response still
//! being written, a request body not yet read, a `100 Continue` before the
//! body, or a pipelined request sitting in the service's buffer all keep the
//! connection busy.

use std::collections::VecDeque;

/// A head longer than this is not followed: the connection cannot go back.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Requests read ahead of their responses beyond this are not followed.
const MAX_PIPELINED: usize = 256;
/// A chunk-size line (extensions included) longer than this is not followed.
const MAX_CHUNK_LINE: usize = 4096;

/// The state of one connection's exchanges.
#[derive(Debug, Default)]
pub(crate) struct Exchange {
    requests: Reader,
    responses: Reader,
    /// Requests whose head was read and whose final response is not complete
    /// yet, oldest first.
    waiting: VecDeque<Request>,
    /// Whether the final response being written ends the connection.
    closes: bool,
    /// The connection can no longer go back: it will close, switched
    /// protocols, or carries something this does not follow.
    over: bool,
}

/// What a request's head says that its response depends on.
#[derive(Debug, Clone, Copy)]
struct Request {
    head: bool,
    connect: bool,
    close: bool,
}

/// One direction: a head being read, then a body.
#[derive(Debug, Default)]
struct Reader {
    phase: Phase,
    /// A head that spans reads, gathered.
    head: Vec<u8>,
    end: LineEnds,
}

#[derive(Debug, Default)]
enum Phase {
    #[default]
    Head,
    Length(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    /// The CRLF after a chunk's data (`true`: its CR was seen).
    ChunkDataEnd(bool),
    Trailers(LineEnds),
}

/// Finds the empty line that ends a head (or a trailer section): CRLF or bare
/// LF line ends, as `httparse` accepts them.
#[derive(Debug, Default, Clone, Copy)]
struct LineEnds {
    /// 0: inside a line; 1: just after a line end; 2: after a line end and a CR.
    state: u8,
}

impl LineEnds {
    fn after_line_end() -> LineEnds {
        LineEnds { state: 1 }
    }

    /// The length of `bytes` up to and including the empty line, if it is there.
    fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            self.state = match (b, self.state) {
                (b'\n', 1 | 2) => {
                    self.state = 0;
                    return Some(i + 1);
                }
                (b'\n', _) => 1,
                (b'\r', 1) => 2,
                _ => 0,
            };
        }
        None
    }
}

/// A body's framing, from a head's headers.
#[derive(Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the connection closes, or unknowable: the connection cannot go back.
    Unfollowed,
}

/// What a head's headers say about framing and keep-alive.
struct Headers {
    framing: Framing,
    close: bool,
    keep_alive: bool,
}

/// A response with neither length nor chunking runs until the connection
/// closes; a request without either has no body.
fn headers(parsed: &[httparse::Header<'_>], request: bool) -> Headers {
    let (mut length, mut chunked, mut coded, mut lengths_differ) = (None::<u64>, false, false, false);
    let (mut close, mut keep_alive) = (false, false);
    for h in parsed {
        if h.name.eq_ignore_ascii_case("content-length") {
            // Digits only (no sign, no list): what HTTP servers accept.
            let v = h.value.trim_ascii();
            let v = (!v.is_empty() && v.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(v).ok()?.parse().ok())
                .flatten();
            match (length, v) {
                (_, None) => lengths_differ = true,
                (Some(l), Some(v)) if l != v => lengths_differ = true,
                (_, v) => length = v,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            coded = true;
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let framing = match (coded, chunked, length) {
        (true, true, _) => Framing::Chunked,
        (true, false, _) => Framing::Unfollowed,
        _ if lengths_differ => Framing::Unfollowed,
        (false, _, Some(n)) => Framing::Length(n),
        (false, _, None) if request => Framing::Length(0),
        (false, _, None) => Framing::Unfollowed,
    };
    Headers { framing, close, keep_alive }
}

/// A head taken in full (parsed), more of it to come, or one that cannot be followed.
enum Taken<T> {
    More,
    Done(T),
    Bad,
}

/// A parser's answer: `Some((head length, what it says))` when complete,
/// `None` when more is needed, `Err` when it is not a head.
type Parsed<T> = Result<Option<(usize, T)>, ()>;

/// Takes a head from `bytes`. Most heads come whole and are parsed where
/// they are; one that spans reads is gathered in `gathered` until its empty
/// line (found by `end`, in linear time however it is cut), then parsed.
fn take_head<T>(
    gathered: &mut Vec<u8>,
    end: &mut LineEnds,
    bytes: &mut &[u8],
    request: bool,
    parse: fn(&[u8]) -> Parsed<T>,
) -> Taken<T> {
    if request && gathered.is_empty() {
        // Empty lines before a request line are ignored (RFC 9112, 2.2).
        let blank = bytes.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
        *bytes = &bytes[blank..];
        if bytes.is_empty() {
            return Taken::More;
        }
    }
    if gathered.is_empty() {
        return match parse(bytes) {
            Ok(Some((len, what))) if len <= MAX_HEAD => {
                *bytes = &bytes[len..];
                Taken::Done(what)
            }
            Ok(None) if bytes.len() <= MAX_HEAD => {
                *end = LineEnds::default();
                end.scan(bytes);
                gathered.extend_from_slice(bytes);
                *bytes = &[];
                Taken::More
            }
            _ => Taken::Bad,
        };
    }
    let found = end.scan(bytes);
    let used = found.unwrap_or(bytes.len());
    if gathered.len() + used > MAX_HEAD {
        return Taken::Bad;
    }
    gathered.extend_from_slice(&bytes[..used]);
    *bytes = &bytes[used..];
    if found.is_none() {
        return Taken::More;
    }
    let parsed = parse(gathered);
    let whole = gathered.len();
    gathered.clear();
    match parsed {
        Ok(Some((len, what))) if len == whole => Taken::Done(what),
        _ => Taken::Bad,
    }
}

/// A request head: what its response depends on, and its body's framing.
fn parse_request(head: &[u8]) -> Parsed<(Request, Framing)> {
    let mut parsed = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut parsed) {
        Ok(httparse::Status::Complete(len)) => {
            let h = headers(req.headers, true);
            let method = req.method.unwrap_or_default();
            let close = h.close || (req.version == Some(0) && !h.keep_alive);
            Ok(Some((len, (Request { head: method == "HEAD", connect: method == "CONNECT", close }, h.framing))))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

/// A response head: its status, whether it ends the connection, its body's framing.
fn parse_response(head: &[u8]) -> Parsed<(u16, bool, Framing)> {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut parsed);
    match res.parse(head) {
        Ok(httparse::Status::Complete(len)) => {
            let h = headers(res.headers, false);
            let close = h.close || (res.version == Some(0) && !h.keep_alive);
            Ok(Some((len, (res.code.unwrap_or_default(), close, h.framing))))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

impl Reader {
    fn at_rest(&self) -> bool {
        matches!(self.phase, Phase::Head) && self.head.is_empty()
    }

    /// Takes body bytes from `bytes`: `Some(true)` when the body ended,
    /// `None` when it cannot be followed.
    fn take_body(&mut self, bytes: &mut &[u8]) -> Option<bool> {
        while !bytes.is_empty() {
            match &mut self.phase {
                Phase::Head => return Some(true),
                Phase::Length(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    *bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.phase = Phase::Head;
                    }
                }
                Phase::ChunkSize(line) => {
                    let end = bytes.iter().position(|&b| b == b'\n');
                    let used = end.map_or(bytes.len(), |i| i + 1);
                    if line.len() + used > MAX_CHUNK_LINE {
                        return None;
                    }
                    line.extend_from_slice(&bytes[..used]);
                    *bytes = &bytes[used..];
                    if end.is_some() {
                        let size = match httparse::parse_chunk_size(line) {
                            Ok(httparse::Status::Complete((_, size))) => size,
                            _ => return None,
                        };
                        self.phase = if size == 0 {
                            Phase::Trailers(LineEnds::after_line_end())
                        } else {
                            Phase::ChunkData(size)
                        };
                    }
                }
                Phase::ChunkData(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    *bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.phase = Phase::ChunkDataEnd(false);
                    }
                }
                Phase::ChunkDataEnd(cr) => {
                    match (bytes[0], *cr) {
                        (b'\r', false) => *cr = true,
                        (b'\n', true) => self.phase = Phase::ChunkSize(Vec::new()),
                        _ => return None, // Exactly CRLF, as HTTP servers insist.
                    }
                    *bytes = &bytes[1..];
                }
                Phase::Trailers(end) => match end.scan(bytes) {
                    Some(used) => {
                        *bytes = &bytes[used..];
                        self.phase = Phase::Head;
                    }
                    None => *bytes = &[],
                },
            }
            if matches!(self.phase, Phase::Head) {
                return Some(true);
            }
        }
        Some(matches!(self.phase, Phase::Head))
    }

    fn start_body(&mut self, framing: Framing) -> bool {
        self.head.clear();
        self.phase = match framing {
            Framing::Length(0) => Phase::Head,
            Framing::Length(n) => Phase::Length(n),
            Framing::Chunked => Phase::ChunkSize(Vec::new()),
            Framing::Unfollowed => return false,
        };
        true
    }
}

impl Exchange {
    /// At rest between requests: it could go back to portmux now.
    pub(crate) fn at_rest(&self) -> bool {
        !self.over && self.waiting.is_empty() && self.requests.at_rest() && self.responses.at_rest()
    }

    /// It can never go back: it will close, switched protocols, or carries
    /// what is not followed.
    pub(crate) fn is_over(&self) -> bool {
        self.over
    }

    /// The service read `bytes` (requests).
    pub(crate) fn read(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.over {
            if !matches!(self.requests.phase, Phase::Head) {
                if self.requests.take_body(&mut bytes).is_none() {
                    self.over = true;
                }
                continue;
            }
            let request =
                match take_head(&mut self.requests.head, &mut self.requests.end, &mut bytes, true, parse_request) {
                    Taken::More => continue,
                    Taken::Bad => None,
                    Taken::Done(r) => Some(r),
                };
            match request {
                // Pipelined requests beyond MAX_PIPELINED are not followed.
                Some((r, framing)) if self.waiting.len() < MAX_PIPELINED && self.requests.start_body(framing) => {
                    self.waiting.push_back(r)
                }
                _ => self.over = true,
            }
        }
    }

    /// The service wrote `bytes` (responses).
    pub(crate) fn wrote(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.over {
            if !matches!(self.responses.phase, Phase::Head) {
                match self.responses.take_body(&mut bytes) {
                    None => self.over = true,
                    Some(true) => self.answered(),
                    Some(false) => {}
                }
                continue;
            }
            let response =
                match take_head(&mut self.responses.head, &mut self.responses.end, &mut bytes, false, parse_response) {
                    Taken::More => continue,
                    Taken::Bad => None,
                    Taken::Done(r) => Some(r),
                };
            let Some((status, close, framing)) = response else {
                self.over = true;
                continue;
            };
            // A response to no request read is not an exchange this follows.
            let Some(&request) = self.waiting.front() else {
                self.over = true;
                continue;
            };
            match status {
                101 => self.over = true, // Switching Protocols: no longer HTTP/1.
                100..=199 => {
                    // Informational: the final response is still to come.
                    self.responses.start_body(Framing::Length(0));
                }
                _ => {
                    self.closes = close || request.close;
                    let framing = if request.head || status == 204 || status == 304 {
                        Framing::Length(0)
                    } else if request.connect && (200..300).contains(&status) {
                        Framing::Unfollowed // A tunnel.
                    } else {
                        framing
                    };
                    if !self.responses.start_body(framing) {
                        self.over = true;
                    } else if matches!(self.responses.phase, Phase::Head) {
                        self.answered();
                    }
                }
            }
        }
    }

    /// The final response to the oldest waiting request is complete.
    fn answered(&mut self) {
        self.waiting.pop_front();
        if self.closes {
            self.over = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Exchange;

    /// One step of a connection's life: bytes read or written, then whether
    /// the connection is at rest.
    enum Step<'a> {
        Read(&'a str, bool),
        Wrote(&'a str, bool),
    }
    use Step::{Read, Wrote};

    /// Runs `steps` with every byte string fed whole, one byte at a time,
    /// and split at each position.
    fn check(what: &str, steps: &[Step<'_>]) {
        for split in 0..3 {
            let mut x = Exchange::default();
            for (i, step) in steps.iter().enumerate() {
                let (bytes, rest, read) = match step {
                    Read(b, r) => (b.as_bytes(), *r, true),
                    Wrote(b, r) => (b.as_bytes(), *r, false),
                };
                let mut feed = |chunk: &[u8]| if read { x.read(chunk) } else { x.wrote(chunk) };
                match split {
                    0 => feed(bytes),
                    1 => bytes.chunks(1).for_each(&mut feed),
                    _ => {
                        let (a, b) = bytes.split_at(bytes.len() / 2);
                        feed(a);
                        feed(b);
                    }
                }
                assert_eq!(x.at_rest(), rest, "{what}: step {i} (split {split})");
            }
        }
    }

    const GET: &str = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[test]
    fn keep_alive_exchanges_come_to_rest_after_each_response() {
        check("keep-alive", &[Read(GET, false), Wrote(OK, true), Read(GET, false), Wrote(OK, true)]);
        check(
            "a response in pieces",
            &[
                Read(GET, false),
                Wrote("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", false),
                Wrote("01234", false),
                Wrote("56789", true),
            ],
        );
        check(
            "bare LF line ends",
            &[Read("GET / HTTP/1.1\nHost: x\n\n", false), Wrote("HTTP/1.1 200 OK\ncontent-length: 0\n\n", true)],
        );
        check("empty lines before a request", &[Read("\r\n", true), Read(GET, false), Wrote(OK, true)]);
    }

    #[test]
    fn request_bodies_must_be_read_in_full() {
        let post = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n";
        check("read, then answered", &[Read(post, false), Read("hello", false), Wrote(OK, true)]);
        check(
            "answered before its body was read",
            &[Read(post, false), Wrote(OK, false), Read("hel", false), Read("lo", true)],
        );
        let chunked = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        check(
            "chunked, with extensions and trailers",
            &[
                Read(chunked, false),
                Read("5;ext=1\r\nhello\r\n", false),
                Read("0\r\nTrailer: t\r\n\r\n", false),
                Wrote(OK, true),
            ],
        );
        check("chunked, no trailers", &[Read(chunked, false), Read("3\r\nabc\r\n0\r\n\r\n", false), Wrote(OK, true)]);
        let expect = "PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        check(
            "100 Continue first",
            &[Read(expect, false), Wrote("HTTP/1.1 100 Continue\r\n\r\n", false), Read("hi", false), Wrote(OK, true)],
        );
    }

    #[test]
    fn response_framing_is_followed() {
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        check(
            "a chunked response",
            &[Read(GET, false), Wrote(chunked, false), Wrote("2\r\nok\r\n", false), Wrote("0\r\n\r\n", true)],
        );
        let head = "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n";
        check("HEAD: no body", &[Read(head, false), Wrote("HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", true)]);
        check("204: no body", &[Read(GET, false), Wrote("HTTP/1.1 204 No Content\r\n\r\n", true)]);
        check(
            "304: no body",
            &[Read(GET, false), Wrote("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", true)],
        );
        check(
            "no length: until close",
            &[Read(GET, false), Wrote("HTTP/1.1 200 OK\r\n\r\nbody", false), Read(GET, false)],
        );
    }

    #[test]
    fn pipelined_requests_keep_it_busy_until_all_are_answered() {
        let two = format!("{GET}{GET}");
        check("two at once", &[Read(&two, false), Wrote(OK, false), Wrote(OK, true)]);
        check("half of the next one read", &[Read(GET, false), Read("GET / HT", false), Wrote(OK, false)]);
        let (many, answers) = (GET.repeat(super::MAX_PIPELINED + 1), OK.repeat(super::MAX_PIPELINED + 1));
        check("more than are followed", &[Read(&many, false), Wrote(&answers, false)]);
    }

    #[test]
    fn closing_and_switching_end_it_for_good() {
        check(
            "Connection: close asked",
            &[Read("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", false), Wrote(OK, false)],
        );
        check(
            "Connection: close answered",
            &[Read(GET, false), Wrote("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", false)],
        );
        check("HTTP/1.0", &[Read("GET / HTTP/1.0\r\n\r\n", false), Wrote(OK, false)]);
        check(
            "HTTP/1.0 keep-alive",
            &[
                Read("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", false),
                Wrote("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", true),
            ],
        );
        let upgrade = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        check(
            "101",
            &[Read(upgrade, false), Wrote("HTTP/1.1 101 Switching Protocols\r\n\r\n", false), Read("\x01\x00", false)],
        );
        check(
            "upgrade declined",
            &[Read(upgrade, false), Wrote("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", true)],
        );
        check(
            "CONNECT",
            &[Read("CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n", false), Wrote("HTTP/1.1 200 OK\r\n\r\n", false)],
        );
    }

    #[test]
    fn what_cannot_be_followed_is_never_at_rest() {
        check("garbage", &[Read("\x16\x03\x01 not http\r\n\r\n", false), Wrote(OK, false)]);
        check("a response to nothing", &[Wrote(OK, false), Read(GET, false)]);
        let lengths = "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        check("two lengths", &[Read(lengths, false), Wrote(OK, false)]);
        let signed = "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\nx";
        check("a signed length", &[Read(signed, false), Wrote(OK, false)]);
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        check(
            "chunk data without its CRLF",
            &[Read(GET, false), Wrote(chunked, false), Wrote("2\r\nok\n0\r\n\r\n", false)],
        );
        let coded = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n";
        check("coded, not chunked", &[Read(coded, false), Wrote(OK, false)]);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(super::MAX_HEAD));
        check("a head too long", &[Read(&long, false), Wrote(OK, false)]);
        check(
            "a bad chunk size",
            &[Read(GET, false), Wrote("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", false)],
        );
    }
}
