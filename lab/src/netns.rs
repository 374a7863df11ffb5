//! A small network lab, when run as root: one network namespace per host,
//! each joined to a bridge in the root namespace by a veth pair (the host's
//! `eth0`). Processes of the root namespace (a bench's or a harness's
//! clients) reach every host at its address through the bridge. Everything
//! is removed on drop.
//!
//! [`Lab::cap`] puts a `tc tbf` qdisc on both directions of a host's link
//! (egress of the namespace side = upload, egress of the bridge side =
//! download). The tbf on the namespace side stands for the host's NIC, so
//! its queue is, by default, the kernel's built-in one for a NIC:
//! `pfifo_fast`, which sends packets of sockets that ask for
//! `TC_PRIO_INTERACTIVE` first and `TC_PRIO_BULK` last (see
//! `ferry_worker::net`), holding about 100 ms at the rate. With `host_fifo`
//! it is a plain 100 ms FIFO, as the bridge side (the switch's port towards
//! the host) always is.
//!
//! [`Lab::exec`] runs a command inside a host's namespace: the chaos
//! harness cuts links there with `iptables`, whose rules each namespace
//! keeps for itself.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

use crate::procs::run;

/// The namespaces, veths and bridge of one run.
pub struct Lab {
    tag: String,
    subnet: u8,
    hosts: usize,
    rule: Vec<String>,
}

impl Lab {
    /// Why this machine cannot host a lab, if it cannot.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root".into());
        }
        for tool in ["ip", "tc", "iptables"] {
            if Command::new(tool).arg("-V").output().is_err() {
                return Some(format!("`{tool}` not found"));
            }
        }
        None
    }

    /// Creates the bridge and `hosts` namespaces.
    pub fn create(hosts: usize) -> anyhow::Result<Self> {
        if hosts > 200 {
            bail!("the lab holds at most 200 hosts");
        }
        // Names unique per lab, not only per process: a namespace's end of
        // a veth pair goes away in the kernel's own time after the
        // namespace is deleted, so the next lab of the same process must
        // not reuse the names (the chaos smoke runs three in a row).
        static LABS: AtomicU32 = AtomicU32::new(0);
        let n = LABS.fetch_add(1, Ordering::Relaxed) % 10;
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        let mut lab = Self { tag, subnet: ((pid + n) % 200) as u8 + 20, hosts: 0, rule: vec![] };
        let bridge = lab.bridge();
        let host = format!("{}/24", lab.host_ip());
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&["ip", "addr", "add", &host, "dev", &bridge])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        // Bridged frames may pass through iptables (br_netfilter), where a
        // Docker host drops forwarded traffic by default.
        let rule: Vec<String> =
            ["FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT"].iter().map(|s| s.to_string()).collect();
        let mut insert = vec!["iptables".to_string(), "-I".into()];
        insert.extend(rule.iter().cloned());
        run(&insert.iter().map(String::as_str).collect::<Vec<_>>())?;
        lab.rule = rule;
        for i in 0..hosts {
            let (ns, veth, ip) = (lab.ns(i), lab.veth(i), format!("{}/24", lab.ip(i)));
            run(&["ip", "netns", "add", &ns])?;
            lab.hosts = i + 1;
            run(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run(&["ip", "link", "set", &veth, "master", &bridge, "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &ip, "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// Caps both directions of host `i`'s link at `bytes_per_sec`.
    pub fn cap(&self, i: usize, bytes_per_sec: u64, host_fifo: bool) -> anyhow::Result<()> {
        let (ns, veth) = (self.ns(i), self.veth(i));
        let rate = format!("{}bit", bytes_per_sec * 8);
        let burst = format!("{}", (bytes_per_sec / 50).max(64 * 1024));
        let tbf = ["root", "handle", "1:", "tbf", "rate", &rate, "burst", &burst, "latency", "100ms"];
        let mut down = vec!["tc", "qdisc", "replace", "dev", &veth];
        down.extend(tbf);
        run(&down)?;
        let mut up = vec!["tc", "qdisc", "replace", "dev", "eth0"];
        up.extend(tbf);
        self.exec(i, &up)?;
        if !host_fifo {
            // pfifo_fast holds as many packets as the device's queue
            // length: 100 ms of full-size frames at the rate.
            let frames = (bytes_per_sec / 10 / 1514).max(16).to_string();
            run(&["ip", "-n", &ns, "link", "set", "eth0", "txqueuelen", &frames])?;
            self.exec(i, &["tc", "qdisc", "add", "dev", "eth0", "parent", "1:1", "pfifo_fast"])?;
        }
        Ok(())
    }

    /// Takes host `i`'s cap off again.
    pub fn uncap(&self, i: usize) -> anyhow::Result<()> {
        run(&["tc", "qdisc", "del", "dev", &self.veth(i), "root"])?;
        self.exec(i, &["tc", "qdisc", "del", "dev", "eth0", "root"])
    }

    /// Runs `args` inside host `i`'s namespace and waits for it.
    pub fn exec(&self, i: usize, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["ip", "netns", "exec"];
        let ns = self.ns(i);
        all.push(&ns);
        all.extend(args);
        run(&all)
    }

    fn bridge(&self) -> String {
        format!("fbr{}", self.tag)
    }

    fn veth(&self, i: usize) -> String {
        format!("fv{}h{i}", self.tag)
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("ferry-{}-h{i}", self.tag)
    }

    /// The bridge's address: the root namespace's, on the lab's network.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 211, self.subnet, 1)
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 211, self.subnet, 10 + i as u8)
    }

    /// `program` run inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Runs `f` on a thread that entered host `i`'s namespace: sockets it
    /// creates live there (a socket keeps the namespace it was made in).
    pub fn inside<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.ns(i))).context("open namespace")?;
        let handle = std::thread::spawn(move || {
            // SAFETY: a valid namespace fd; setns affects only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        });
        Ok(handle.join().map_err(|_| anyhow::anyhow!("namespace thread panicked"))??)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            // Deleting our end removes the pair at once.
            let _ = run(&["ip", "link", "del", &self.veth(i)]);
            let _ = run(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge()]);
        if !self.rule.is_empty() {
            let mut delete = vec!["iptables", "-D"];
            delete.extend(self.rule.iter().map(String::as_str));
            let _ = run(&delete);
        }
    }
}
