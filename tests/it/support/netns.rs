//! A second "host" for the failover tests: a network namespace joined to this machine by a veth
//! pair ([`Netns`]), whose link a test can cut ([`Netns::cut`]) the way a failed switch or a
//! pulled cable would: nothing more arrives, and nobody sends a FIN or a RST.
//!
//! The two ends get link-local addresses from one 169.254.x.y/30 that exist only on this pair,
//! so traffic goes nowhere but between the namespace and this machine's own end. Names and
//! subnets are unique per call, so tests (and test processes) build their pairs in parallel.
//! Dropping a [`Netns`] deletes the namespace and both ends of the pair, also when the test
//! failed.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `ip` from iproute2; without them it panics
//! saying so. Not responsible for any heimdall behaviour: tests state that themselves.

use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// A network namespace with a veth pair to this machine. See the module docs.
pub struct Netns {
    name: String,
    host_if: String,
    host_addr: Ipv4Addr,
    inner_addr: Ipv4Addr,
}

impl Netns {
    /// Builds the namespace, the pair and the addresses, and brings both ends up.
    pub fn create() -> Netns {
        require_root_and_ip();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Interface names are limited to 15 bytes: "hm" + pid (at most 6 hex digits, pid_max
        // is 2^22) + counter + one letter.
        let tag = format!("hm{:x}x{n:x}", std::process::id());
        let (host_addr, inner_addr) = free_subnet(std::process::id(), n);
        let ns = Netns {
            name: tag.clone(),
            host_if: format!("{tag}h"),
            host_addr,
            inner_addr,
        };
        let inner_if = format!("{tag}n");
        // A namespace of ours can only exist already if a process that had our pid was killed
        // before its Drop ran: it is stale.
        if ip_output(["netns", "list"]).contains(&ns.name) {
            let _ = ip_output(["netns", "del", &ns.name]);
        }
        // From here on, Drop removes whatever was built, also when a step panics.
        ip(["netns", "add", &ns.name]);
        ip([
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &inner_if,
            "netns",
            &ns.name,
        ]);
        ip([
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &ns.host_if,
        ]);
        ip(["link", "set", &ns.host_if, "up"]);
        ip([
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{inner_addr}/30"),
            "dev",
            &inner_if,
        ]);
        ip(["-n", &ns.name, "link", "set", &inner_if, "up"]);
        ip(["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// The address of this machine's end: what a process inside connects to.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The address of the namespace's end: where its connections come from.
    pub fn inner_addr(&self) -> Ipv4Addr {
        self.inner_addr
    }

    /// `cmd` to be run inside the namespace (`ip netns exec`, which execs it: the child's pid is
    /// the command's own). Program, arguments, environment changes and working directory are
    /// carried over; stdio is the caller's to set.
    pub fn wrap(&self, cmd: &Command) -> Command {
        super::run_under("ip", &["netns", "exec", &self.name], cmd)
    }

    /// Cuts the link by taking this machine's end down: from then on nothing passes either
    /// way, and neither side is told.
    pub fn cut(&self) {
        ip(["link", "set", &self.host_if, "down"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the pair, and a veth end never outlives
        // its peer. The host end is deleted by name too, in case the namespace never got it.
        let problems: Vec<String> = [
            run_ip(["netns", "del", &self.name]),
            if ip_output(["link", "show", "dev", &self.host_if]).is_empty() {
                Ok(())
            } else {
                run_ip(["link", "del", &self.host_if])
            },
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect();
        for problem in problems {
            eprintln!("Netns {}: {problem}", self.name);
        }
    }
}

fn require_root_and_ip() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "the failover tests build a network namespace and a veth pair (`ip netns add`), which \
         needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); this test process runs as uid {euid}. \
         Run the suite as root, as CI does."
    );
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "the failover tests need `ip` from iproute2 to build a network namespace: \
         `apt-get install iproute2` (scripts/ensure-deps does it)"
    );
}

/// A /30 in 169.254.0.0/16 that no interface of this machine uses yet: (this end, the other
/// end). The start depends on the pid and the counter, so parallel test processes start apart;
/// 169.254.0.x, 169.254.169.x (cloud metadata services) and 169.254.255.x are left alone.
fn free_subnet(pid: u32, n: u64) -> (Ipv4Addr, Ipv4Addr) {
    let in_use = ip_output(["-o", "-4", "addr", "show"]);
    const THIRD: std::ops::RangeInclusive<u8> = 1..=254;
    let subnets = (THIRD.count() * 64) as u64;
    let start = (u64::from(pid).wrapping_mul(2_654_435_761) ^ n.wrapping_mul(40_503)) % subnets;
    (0..subnets)
        .map(|i| (start + i) % subnets)
        .map(|s| (1 + (s / 64) as u8, (s % 64) as u8 * 4))
        .filter(|&(third, _)| third != 169)
        .map(|(third, base)| {
            (
                Ipv4Addr::new(169, 254, third, base + 1),
                Ipv4Addr::new(169, 254, third, base + 2),
            )
        })
        .find(|(host, _)| {
            // Any address of the /30 in use rules it out ("inet 169.254.7.1/30" in the list).
            let o = host.octets();
            (0..4u8).all(|k| {
                let addr = Ipv4Addr::new(o[0], o[1], o[2], (o[3] & !3) + k);
                !in_use.contains(&format!(" {addr}/"))
            })
        })
        .expect("Netns: no free /30 left in 169.254.0.0/16")
}

/// Runs `ip ARGS` and panics with its stderr if it fails.
fn ip<const N: usize>(args: [&str; N]) {
    if let Err(problem) = run_ip(args) {
        panic!("Netns: {problem}");
    }
}

fn run_ip<const N: usize>(args: [&str; N]) -> Result<(), String> {
    let output = ip_command(args)?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "`ip {}` failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// The stdout of `ip ARGS`, empty if it fails.
fn ip_output<const N: usize>(args: [&str; N]) -> String {
    match ip_command(args) {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
        _ => String::new(),
    }
}

fn ip_command<const N: usize>(args: [&str; N]) -> Result<Output, String> {
    Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))
}
