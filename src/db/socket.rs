//! Finding the connection's socket, which the `postgres` crate does not expose: the connected
//! stream sockets heimdall has open, before and after a connect. `run` hands the new one to the
//! keeper and the watchdog watches it; a connect attempt that overran its limit has its socket
//! shut down (`connect.rs`).

use std::os::fd::RawFd;

/// The connected stream sockets heimdall has open now.
pub fn connected() -> Vec<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| is_connected_stream(fd))
        .collect()
}

/// The connected stream sockets opened since `before` ([`connected`]): after a connect, its
/// socket, since a connect opens exactly one that stays (failed attempts on other hosts are
/// closed).
pub fn opened_since(before: &[RawFd]) -> Vec<RawFd> {
    connected()
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .collect()
}

fn is_connected_stream(fd: RawFd) -> bool {
    // SAFETY: stat is plain data; fstat writes into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid stat buffer for fstat to fill; a bad descriptor only fails.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return false;
    }
    let mut kind: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are valid for getsockopt to write an int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &mut len,
        )
    };
    if rc != 0 || kind != libc::SOCK_STREAM {
        return false;
    }
    // SAFETY: sockaddr_storage is plain data and large enough for any address.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` describe a writable buffer of that size.
    unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) == 0 }
}
