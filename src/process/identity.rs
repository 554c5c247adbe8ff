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

/// The host's name, or `unknown-host`.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it unless
    // the name is truncated, and the last byte stays 0 because we pass len - 1.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "unknown-host".to_owned();
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
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
