//! A TCP proxy in front of a test cluster that can cut the network without closing anything,
//! and records the client's simple queries.
//!
//! Not responsible for any heimdall behaviour: tests state that themselves.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::TestPostgres;

/// Forwards every connection on its own loopback port to a server port. [`Proxy::cut`] stops
/// forwarding in both directions but keeps every socket open, as a dead network path does: no
/// FIN, no RST, and the kernel still acknowledges what heimdall sends. Records each simple
/// query ('Q') the client sends.
pub struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    cut: AtomicBool,
    closed: AtomicBool,
    /// Clones of every socket, so none closes before the proxy is dropped.
    sockets: Mutex<Vec<TcpStream>>,
    /// The client's simple queries, with when the proxy read them.
    queries: Mutex<Vec<(Instant, String)>>,
}

/// How often an idle forwarding thread looks whether the proxy was dropped.
const PROXY_POLL: Duration = Duration::from_millis(20);

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: cannot listen");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState::default());
        let accept_state = Arc::clone(&state);
        thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.closed.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let clones = (client.try_clone(), server.try_clone());
                let kept = (client.try_clone(), server.try_clone());
                let (Ok(client2), Ok(server2)) = clones else {
                    continue;
                };
                let (Ok(client3), Ok(server3)) = kept else {
                    continue;
                };
                accept_state
                    .sockets
                    .lock()
                    .unwrap()
                    .extend([client3, server3]);
                let up = Arc::clone(&accept_state);
                thread::spawn(move || pump(client, server, &up, Some(ClientMessages::default())));
                let down = Arc::clone(&accept_state);
                thread::spawn(move || pump(server2, client2, &down, None));
            }
        });
        Proxy { port, state }
    }

    /// A URL for the cluster `pg`, through this proxy.
    pub fn url(&self, pg: &TestPostgres) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/postgres?sslmode=disable",
            pg.superuser(),
            self.port
        )
    }

    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
    }

    pub fn queries(&self) -> Vec<(Instant, String)> {
        self.state.queries.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::SeqCst);
        for socket in self.state.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        // Wake the accept loop so it sees `closed` and ends.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` to `to` until either side closes or the proxy is dropped; after a cut it
/// reads and discards, and leaves both sockets open.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    state: &ProxyState,
    mut parse: Option<ClientMessages>,
) {
    let _ = from.set_read_timeout(Some(PROXY_POLL));
    let mut buf = [0u8; 16 * 1024];
    while !state.closed.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                if !state.cut.load(Ordering::SeqCst) {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        };
        if state.cut.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(parse) = parse.as_mut() {
            let now = Instant::now();
            for sql in parse.feed(&buf[..n]) {
                state.queries.lock().unwrap().push((now, sql));
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Splits the frontend's byte stream into messages: first the untyped startup packet (int32
/// length including itself), then typed ones (one type byte, then int32 length including
/// itself). Returns the text of each simple query ('Q').
#[derive(Default)]
struct ClientMessages {
    pending: Vec<u8>,
    started: bool,
}

impl ClientMessages {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut queries = Vec::new();
        loop {
            let header = if self.started { 5 } else { 4 };
            if self.pending.len() < header {
                return queries;
            }
            let len_at = header - 4;
            let len = u32::from_be_bytes(self.pending[len_at..header].try_into().unwrap()) as usize;
            let total = len_at + len;
            assert!(len >= 4, "proxy: malformed frontend message length {len}");
            if self.pending.len() < total {
                return queries;
            }
            let message: Vec<u8> = self.pending.drain(..total).collect();
            if self.started && message[0] == b'Q' {
                let body = &message[header..];
                let sql = body.strip_suffix(&[0]).unwrap_or(body);
                queries.push(String::from_utf8_lossy(sql).into_owned());
            }
            self.started = true;
        }
    }
}
