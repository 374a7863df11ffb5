//! A small network lab for `distribute` when run as root: one network
//! namespace per worker, each joined to a bridge in the root namespace by a
//! veth pair, with a `tc tbf` qdisc capping both directions of every link at
//! B (egress of the namespace side = upload, egress of the bridge side =
//! download). The schedulers listen on the bridge's address. Everything is
//! removed on drop.
//!
//! The tbf on the namespace side stands for the worker host's NIC, so its
//! queue is, by default, the kernel's built-in one for a NIC: `pfifo_fast`,
//! which sends packets of sockets that ask for `TC_PRIO_INTERACTIVE` first
//! and `TC_PRIO_BULK` last (see `ferry_worker::net`), holding about 100 ms
//! at B.
//! With `host_fifo` it is a plain 100 ms FIFO, as the bridge side (the
//! switch's port towards the worker) always is.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{bail, Context};

/// The namespaces, veths and bridge of one run.
pub struct Lab {
    tag: String,
    subnet: u8,
    workers: usize,
    rule: Vec<String>,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
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

    /// Creates the bridge and `workers` capped namespaces.
    pub fn create(workers: usize, bytes_per_sec: u64, host_fifo: bool) -> anyhow::Result<Self> {
        if workers > 200 {
            bail!("the lab holds at most 200 workers");
        }
        let pid = std::process::id();
        let mut lab =
            Self { tag: format!("{}", pid % 100_000), subnet: (pid % 200) as u8 + 20, workers: 0, rule: vec![] };
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
        let rate = format!("{}bit", bytes_per_sec * 8);
        let burst = format!("{}", (bytes_per_sec / 50).max(64 * 1024));
        for i in 0..workers {
            let (ns, veth, ip) = (lab.ns(i), lab.veth(i), format!("{}/24", lab.ip(i)));
            run(&["ip", "netns", "add", &ns])?;
            lab.workers = i + 1;
            run(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run(&["ip", "link", "set", &veth, "master", &bridge, "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &ip, "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            let tbf = ["root", "handle", "1:", "tbf", "rate", &rate, "burst", &burst, "latency", "100ms"];
            let mut down = vec!["tc", "qdisc", "add", "dev", &veth];
            down.extend(tbf);
            run(&down)?;
            let mut up = vec!["ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0"];
            up.extend(tbf);
            run(&up)?;
            if !host_fifo {
                // pfifo_fast holds as many packets as the device's queue
                // length: 100 ms of full-size frames at B.
                let frames = (bytes_per_sec / 10 / 1514).max(16).to_string();
                run(&["ip", "-n", &ns, "link", "set", "eth0", "txqueuelen", &frames])?;
                run(&["ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "parent", "1:1", "pfifo_fast"])?;
            }
        }
        Ok(lab)
    }

    fn bridge(&self) -> String {
        format!("fbr{}", self.tag)
    }

    fn veth(&self, i: usize) -> String {
        format!("fv{}w{i}", self.tag)
    }

    /// Worker `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("ferry-{}-w{i}", self.tag)
    }

    /// The bridge's address (the schedulers listen here).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 211, self.subnet, 1)
    }

    /// Worker `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 211, self.subnet, 10 + i as u8)
    }

    /// `program` run inside worker `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Runs `f` on a thread that entered worker `i`'s namespace: sockets it
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
        for i in 0..self.workers {
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
