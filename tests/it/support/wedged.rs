//! A stderr whose reader is alive but never reads, filled to the brim before heimdall starts:
//! what a wedged logger, a stalled journald stream or `| less` in another window look like to a
//! writer. Each kind ([`Wedged::pipe`], [`Wedged::fifo`], [`Wedged::socket`], [`Wedged::pty`])
//! holds its reading end open and unread until [`Wedged::unwedge`] starts reading.
//!
//! Filling goes through an open file description of the test's own (non-blocking), so the one
//! heimdall inherits stays blocking, as a real logger's pipe would be.
//!
//! Not responsible for any heimdall behaviour: tests state that themselves.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

/// The writing end heimdall gets as stderr, and the reading end nobody reads.
pub struct Wedged {
    writer: OwnedFd,
    reader: OwnedFd,
    /// How many bytes filled it before heimdall started.
    pub filled: usize,
}

impl Wedged {
    /// An anonymous pipe, as `heimdall … 2>&1 | logger` gives.
    pub fn pipe() -> Wedged {
        let (reader, writer) = io::pipe().expect("cannot make a pipe");
        Wedged::filled(writer.into(), reader.into())
    }

    /// A named pipe in `dir`, as `2> /run/some.fifo` gives.
    pub fn fifo(dir: &Path) -> Wedged {
        let path = dir.join("stderr.fifo");
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        // The reader first, non-blocking, so that opening the writer does not wait for one.
        let reader = open(&c_path, libc::O_RDONLY | libc::O_NONBLOCK);
        let writer = open(&c_path, libc::O_WRONLY);
        Wedged::filled(writer, reader)
    }

    /// A Unix stream socket, as journald's stdout stream (`StandardError=journal`) gives.
    pub fn socket() -> Wedged {
        let mut fds = [-1; 2];
        // SAFETY: `fds` has room for the two descriptors.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just created and belong to nobody else.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut filled = 0;
        let chunk = [b'x'; 4096];
        loop {
            // SAFETY: `chunk` is valid for its length; MSG_DONTWAIT makes only this call
            // non-blocking.
            let n = unsafe {
                libc::send(
                    writer.as_raw_fd(),
                    chunk.as_ptr().cast(),
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            filled += n as usize;
        }
        Wedged {
            writer,
            reader,
            filled,
        }
    }

    /// A pseudo-terminal whose master side nobody reads, as a frozen terminal window gives.
    pub fn pty() -> Wedged {
        // SAFETY: plain calls on a descriptor we own; ptsname's buffer is copied at once.
        let (master, slave_path) = unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(master >= 0, "posix_openpt: {}", io::Error::last_os_error());
            assert_eq!(libc::grantpt(master), 0, "grantpt");
            assert_eq!(libc::unlockpt(master), 0, "unlockpt");
            let name = libc::ptsname(master);
            assert!(!name.is_null(), "ptsname");
            (
                OwnedFd::from_raw_fd(master),
                std::ffi::CStr::from_ptr(name).to_owned(),
            )
        };
        let slave = open(&slave_path, libc::O_WRONLY | libc::O_NOCTTY);
        Wedged::filled(slave, master)
    }

    /// Fills `writer` through a non-blocking open file description of its own.
    fn filled(writer: OwnedFd, reader: OwnedFd) -> Wedged {
        let path = CString::new(format!("/proc/self/fd/{}", writer.as_raw_fd())).unwrap();
        let filler = File::from(open(
            &path,
            libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        ));
        let mut filled = 0;
        let chunk = [b'x'; 4096];
        loop {
            match io::Write::write(&mut &filler, &chunk) {
                Ok(n) if n > 0 => filled += n,
                _ => break,
            }
        }
        assert!(filled > 0, "could not fill the wedged stderr");
        Wedged {
            writer,
            reader,
            filled,
        }
    }

    /// A duplicate of the writing end, for `Command::stderr`.
    pub fn stdio(&self) -> Stdio {
        Stdio::from(
            self.writer
                .try_clone()
                .expect("cannot duplicate the writing end"),
        )
    }

    /// Starts reading, in the background: [`Drained::text`] is what was written after the
    /// filling, so far.
    pub fn unwedge(self) -> Drained {
        let Wedged {
            writer,
            reader,
            filled,
        } = self;
        drop(writer);
        let all = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&all);
        std::thread::spawn(move || {
            let mut reader = File::from(reader);
            let mut buf = [0u8; 65536];
            // EIO is a pty's EOF once the last slave descriptor closes.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Drained { all, filled }
    }
}

/// A wedged stderr being read again.
pub struct Drained {
    all: Arc<Mutex<Vec<u8>>>,
    filled: usize,
}

impl Drained {
    /// What was written after the filling, so far.
    pub fn text(&self) -> String {
        let all = self.all.lock().unwrap();
        // A terminal turns "\n" into "\r\n".
        let text = String::from_utf8_lossy(&all[self.filled.min(all.len())..]).replace('\r', "");
        text.trim_start_matches('x').to_owned()
    }
}

fn open(path: &CString, flags: libc::c_int) -> OwnedFd {
    // SAFETY: a valid NUL-terminated path.
    let fd: RawFd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "cannot open {path:?}: {}",
        io::Error::last_os_error()
    );
    // SAFETY: just opened, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
