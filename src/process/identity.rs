//! Who and where heimdall runs, for its configuration: the host's name (in heimdall's
//! `application_name`) and the effective user's entry in the password database (libpq's default
//! user name and home directory). `config` does no I/O: `run` and `inspect` hand it these
//! lookups, which it makes only when it needs them.

use std::ffi::CStr;
use std::path::PathBuf;

use crate::config::System;

/// The lookups `config` makes through its [`System`].
pub const SYSTEM: System<'static> = System {
    host_name: &host_name,
    os_user: &os_user,
};

/// The host's name (uname's node name, which is what gethostname(2) reads on Linux), or
/// `unknown-host`.
pub fn host_name() -> String {
    let name = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    if name.is_empty() {
        "unknown-host".to_owned()
    } else {
        name
    }
}

/// libpq's default user and home directory: the effective user's entry in the password database.
pub fn os_user() -> (Option<String>, Option<PathBuf>) {
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain data; getpwuid_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; getpwuid_r writes strings into `buf`, which
    // outlives the CStrs read below.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return (std::env::var("USER").ok(), None);
    }
    // SAFETY: on success both fields point to NUL-terminated strings inside `buf`.
    let (name, home) = unsafe { (CStr::from_ptr(pwd.pw_name), CStr::from_ptr(pwd.pw_dir)) };
    (
        Some(name.to_string_lossy().into_owned()),
        Some(PathBuf::from(home.to_string_lossy().into_owned())),
    )
}
