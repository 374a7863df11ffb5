//! Running a reload hook named in the worker's own config. A job or a
//! config file rule only names the hook; the command line comes from this
//! worker's config, never from the cluster.
//!
//! A hook runs in a process group of its own. If it outlives its time (or
//! its job is cancelled, or the worker stops waiting for it), the whole
//! group is killed: `sh -c 'reload; sleep 600'` leaves no `sleep` behind.
//! A hook that exits by itself keeps what it started in the background.

use std::future::Future;
use std::time::Duration;

/// How long a hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `command` with `sh -c`, the job id and installed paths in its
/// environment (`FERRY_JOB_ID`, `FERRY_FILES`: newline-separated), until it
/// exits, [`HOOK_TIMEOUT`] passes or `cancelled` resolves. Returns its exit
/// status, or why it could not run or was killed.
pub async fn run(
    command: &str,
    job_id: &str,
    files: &[String],
    cancelled: impl Future<Output = ()>,
) -> Result<i32, String> {
    let env = [("FERRY_JOB_ID", job_id.to_string()), ("FERRY_FILES", files.join("\n"))];
    run_until(command, &env, cancelled).await
}

/// Runs `command` with `sh -c` and `env` added to the worker's environment,
/// under [`HOOK_TIMEOUT`]. Returns its exit status, or why it could not run.
pub async fn run_with_env(command: &str, env: &[(&str, String)]) -> Result<i32, String> {
    run_until(command, env, std::future::pending()).await
}

async fn run_until(command: &str, env: &[(&str, String)], cancelled: impl Future<Output = ()>) -> Result<i32, String> {
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start hook: {e}"))?;
    let mut group = Group(child.id());
    fail::fail_point!("hook-running", |_| crate::crash("hook-running"));
    let result = tokio::select! {
        waited = tokio::time::timeout(HOOK_TIMEOUT, child.wait()) => match waited {
            Ok(Ok(status)) => {
                group.0 = None;
                Ok(status.code().unwrap_or(-1))
            }
            Ok(Err(e)) => Err(format!("waiting for hook: {e}")),
            Err(_) => Err(format!("hook ran longer than {HOOK_TIMEOUT:?} and was killed")),
        },
        () = cancelled => Err("the job was cancelled while its hook ran; the hook was killed".into()),
    };
    drop(group);
    result
}

/// A hook's process group, killed on drop unless the hook exited by itself
/// (`None`).
struct Group(Option<u32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: plain syscall on a process group id; the group's
            // leader is our unreaped child, so the id is still this group.
            unsafe { libc::killpg(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// Whether a process whose command line contains `marker` is running.
    fn running(marker: &str) -> bool {
        std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(marker))
        })
    }

    #[tokio::test]
    async fn a_cancelled_hook_takes_what_it_started_with_it() {
        let marker = format!("617.{}", std::process::id());
        let cancel = tokio::time::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let result = super::run(&format!("sleep {marker}; true"), "j-1", &[], cancel).await;
        assert!(result.expect_err("cancelled").contains("cancelled"));
        assert!(started.elapsed() < Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(&marker) {
            assert!(Instant::now() < deadline, "sleep {marker} still runs after its hook was cancelled");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[tokio::test]
    async fn a_hook_that_exits_keeps_its_background_work() {
        let marker = format!("619.{}", std::process::id());
        let result = super::run(&format!("sleep {marker} & exit 3"), "j-1", &[], std::future::pending()).await;
        assert_eq!(result, Ok(3));
        std::thread::sleep(Duration::from_millis(200));
        assert!(running(&marker), "what a hook starts in the background and leaves is its business");
        std::process::Command::new("pkill").args(["-f", &marker]).status().ok();
    }
}
