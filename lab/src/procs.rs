//! Child processes for tests and benchmarks: ports free to bind, children
//! that die with their parent, and their logs.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// `n` distinct ports that were free a moment ago, taken from below the
/// kernel's ephemeral range: a port the kernel hands out (to a client's
/// outgoing connection, or to a bind to port 0) could be taken by someone
/// else between this check and the child's bind.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    const SPAN: u32 = 12_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let low = ephemeral_low.saturating_sub(SPAN).max(1_024);
    let span = ephemeral_low.saturating_sub(low).max(1);
    let start = std::process::id().wrapping_mul(7_919) % span;
    // Held until all are found, so they differ.
    let mut held = Vec::with_capacity(n);
    for i in 0..span {
        if held.len() == n {
            break;
        }
        let Ok(port) = u16::try_from(low + (start + i) % span) else { continue };
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        bail!("found only {} free ports of {n} in {low}-{}", held.len(), low + span - 1);
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The last lines of a child's log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Starts `cmd` with stdout and stderr appended to `log` (a restarted
/// child adds to the same log), killed by the kernel if the parent dies
/// without unwinding.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    // PR_SET_PDEATHSIG fires when the thread that forked dies; we fork from
    // a runtime worker (or the main) thread, which lives as long as the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().context("starting a child process")
}

/// Runs `args` (a program and its arguments) to its end: an error, with
/// its stderr, unless it succeeded.
pub fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
