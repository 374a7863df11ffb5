//! Running a reload hook named in the worker's own config. A job or a
//! config file rule only names the hook; the command line comes from this
//! worker's config, never from the cluster.

use std::time::Duration;

/// How long a hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `command` with `sh -c`, the job id and installed paths in its
/// environment (`FERRY_JOB_ID`, `FERRY_FILES`: newline-separated). Returns its
/// exit status, or why it could not run.
pub async fn run(command: &str, job_id: &str, files: &[String]) -> Result<i32, String> {
    run_with_env(command, &[("FERRY_JOB_ID", job_id.to_string()), ("FERRY_FILES", files.join("\n"))]).await
}

/// Runs `command` with `sh -c` and `env` added to the worker's environment,
/// under [`HOOK_TIMEOUT`]. Returns its exit status, or why it could not run.
pub async fn run_with_env(command: &str, env: &[(&str, String)]) -> Result<i32, String> {
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start hook: {e}"))?;
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => Ok(status.code().unwrap_or(-1)),
        Ok(Err(e)) => Err(format!("waiting for hook: {e}")),
        Err(_) => Err(format!("hook ran longer than {HOOK_TIMEOUT:?} and was killed")),
    }
}
