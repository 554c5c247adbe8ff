//! Cancelling the statement in flight (a wait in the server's lock queue) as libpq's `PQcancel`
//! does: the CancelRequest goes on a connection of its own, and heimdall then waits, within a
//! bound, until the other end closes that connection, which is its answer.
//!
//! The `postgres` crate closes its cancel connection as soon as the request is written.
//! PostgreSQL itself does not mind, but a pooler that forwards the request on a server
//! connection it must first open does: PgBouncer 1.18 drops a cancel whose client has gone
//! (the waiter stays queued for the lock), and can crash on it (`disconnect_client(): bad
//! client state`, pgbouncer/pgbouncer#846), taking every pooled holder's lock with it.
//!
//! The crate keeps the backend's key to itself, so it is read back from the request the crate
//! writes into a stream of heimdall's own (see [`backend_key`]). Where that cannot be done, the
//! crate's own cancel is the fallback.

use std::future::Future;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

/// The protocol's CancelRequest code (PostgreSQL's `CANCEL_REQUEST_CODE`).
const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// What cancels the statement in flight on one connection, from another thread.
pub struct Canceller {
    pub token: postgres::CancelToken,
    /// The connection's socket, whose peer the request goes to.
    pub socket: Option<RawFd>,
}

impl Canceller {
    /// Asks the server (or pooler) to cancel the statement in flight, and waits up to `limit`
    /// for it to close the cancel connection. Says what happened, for the log.
    pub fn cancel(&self, limit: Duration) -> String {
        cancel(&self.token, self.socket, limit)
    }
}

fn cancel(token: &postgres::CancelToken, socket: Option<RawFd>, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let answered = backend_key(token).and_then(|(pid, key)| {
        let mut stream = open_like(socket?, limit)?;
        let mut request = Vec::with_capacity(16);
        for field in [16, CANCEL_REQUEST_CODE, pid, key] {
            request.extend_from_slice(&field.to_be_bytes());
        }
        Some(stream.send_and_await_close(&request, deadline))
    });
    match answered {
        Some(Ok(())) => "cancelled the wait for the lock".to_owned(),
        Some(Err(e)) => format!("cancelled the wait for the lock, but got no answer: {e}"),
        None => match token.cancel_query(postgres::NoTls) {
            Ok(()) => "cancelled the wait for the lock".to_owned(),
            Err(e) => format!("cannot cancel the wait: {e}"),
        },
    }
}

/// The backend's process id and secret key, as the crate would send them in a CancelRequest.
fn backend_key(token: &postgres::CancelToken) -> Option<(i32, i32)> {
    const _: () = assert!(
        size_of::<postgres::CancelToken>() == size_of::<tokio_postgres::CancelToken>(),
        "postgres::CancelToken is no longer a plain wrapper of tokio_postgres::CancelToken"
    );
    // SAFETY: `postgres::CancelToken` is a struct with one field, a
    // `tokio_postgres::CancelToken` (postgres 0.19, src/cancel_token.rs). The two have the same
    // size (asserted above, at compile time), so that field starts at offset 0 and fills the
    // whole struct: the bytes of one are a valid value of the other. The copy is a clone, so
    // nothing is dropped twice.
    let inner: tokio_postgres::CancelToken = unsafe {
        std::mem::transmute::<postgres::CancelToken, tokio_postgres::CancelToken>(token.clone())
    };
    let mut capture = Capture::default();
    {
        let request = inner.cancel_query_raw(&mut capture, Passthrough);
        let mut request = std::pin::pin!(request);
        // Every read and write of `Capture` completes at once, so one poll finishes it.
        let mut cx = Context::from_waker(Waker::noop());
        if !matches!(request.as_mut().poll(&mut cx), Poll::Ready(Ok(()))) {
            return None;
        }
    }
    // The request is the last 16 bytes written (after an SSLRequest, in the TLS modes).
    let written = capture
        .written
        .get(capture.written.len().checked_sub(16)?..)?;
    let field = |i: usize| i32::from_be_bytes(written[i * 4..i * 4 + 4].try_into().unwrap());
    (field(0) == 16 && field(1) == CANCEL_REQUEST_CODE).then(|| (field(2), field(3)))
}

/// A new connection to the peer of `socket`: the server or pooler heimdall is connected to.
fn open_like(socket: RawFd, limit: Duration) -> Option<Stream> {
    // SAFETY: `socket` is the open connection's descriptor, borrowed only for getpeername;
    // ManuallyDrop keeps it from being closed here.
    let tcp = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(socket) });
    if let Ok(addr) = tcp.peer_addr() {
        let stream = TcpStream::connect_timeout(&addr, limit).ok()?;
        return Some(Stream::Tcp(stream));
    }
    // SAFETY: as above.
    let unix = ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(socket) });
    let addr = unix.peer_addr().ok()?;
    Some(Stream::Unix(UnixStream::connect(addr.as_pathname()?).ok()?))
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Writes `request`, then reads until the peer closes the connection or `deadline` passes.
    fn send_and_await_close(&mut self, request: &[u8], deadline: Instant) -> io::Result<()> {
        let left = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))
        };
        let mut buf = [0u8; 64];
        match self {
            Stream::Tcp(s) => {
                s.set_write_timeout(Some(left()?))?;
                s.write_all(request)?;
                loop {
                    s.set_read_timeout(Some(left()?))?;
                    if s.read(&mut buf)? == 0 {
                        let _ = s.shutdown(Shutdown::Both);
                        return Ok(());
                    }
                }
            }
            Stream::Unix(s) => {
                s.set_write_timeout(Some(left()?))?;
                s.write_all(request)?;
                loop {
                    s.set_read_timeout(Some(left()?))?;
                    if s.read(&mut buf)? == 0 {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Records what the crate writes; answers an SSLRequest with `S`, then reads end.
#[derive(Default)]
struct Capture {
    written: Vec<u8>,
    answered: bool,
}

impl AsyncRead for &mut Capture {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.answered && buf.remaining() > 0 {
            this.answered = true;
            buf.put_slice(b"S");
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for &mut Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().written.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl TlsStream for &mut Capture {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// A "TLS" that leaves the stream as it is: in the TLS modes the crate asks for TLS before it
/// writes the request, and only the request's bytes matter here.
struct Passthrough;

impl<'a> TlsConnect<&'a mut Capture> for Passthrough {
    type Stream = &'a mut Capture;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<&'a mut Capture>>;

    fn connect(self, stream: &'a mut Capture) -> Self::Future {
        std::future::ready(Ok(stream))
    }
}
