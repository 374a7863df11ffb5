//! `ferry dev` as the README runs it: it prints a `source` line, and a
//! shell that sources it (and has nothing else) reaches the cluster over
//! mutual TLS; with `--insecure`, in plaintext.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{exit_code_within, FERRY};

/// The variables `source FILE` would set (`export A=1 B=2` lines).
fn sourced(file: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// Starts `ferry [PRE] dev` on free ports; the child and its `source` file.
fn start_dev(pre: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(FERRY)
        .args(pre)
        .args(["dev", "--base-port", "0", "--admin-base-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferry dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let file = loop {
        let line = lines.next().expect("ferry dev printed no source line").expect("read");
        if let Some(rest) = line.trim().strip_prefix("source ") {
            break rest.split_whitespace().next().expect("a file").to_string();
        }
    };
    // Keep reading, so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, file)
}

fn run(env: &[(String, String)], args: &[&str]) -> (i32, String) {
    let out = Command::new(FERRY).args(args).env_clear().envs(env.iter().cloned()).output().expect("run ferry");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert_eq!(exit_code_within(&mut child, Duration::from_secs(20)), Some(Some(0)), "ferry dev stops on SIGTERM");
}

#[test]
fn a_shell_that_sources_what_ferry_dev_prints_reaches_it_over_tls() {
    let (child, file) = start_dev(&[]);
    let env = sourced(&file);
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["FERRY_ENDPOINTS", "FERRY_TLS_CA", "FERRY_TLS_CERT", "FERRY_TLS_KEY"], "{env:?}");
    let endpoints = env[0].1.clone();

    // Without the certificate: refused, naming what is missing.
    let (code, text) = run(&env[..1], &["cluster", "status"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("tls-ca: not set"), "{text}");

    let (code, text) = run(&env, &["cluster", "status"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("leader:") && text.contains("d left"), "{text}");
    let (code, text) = run(&env, &["config", "put", "greeting", "hello"]);
    assert_eq!(code, 0, "{text}");
    let last = endpoints.rsplit(',').next().expect("an endpoint");
    let (code, text) = run(&env, &["--endpoints", last, "config", "get", "greeting"]);
    assert_eq!((code, text.trim()), (0, "hello"));
    let dir = std::path::Path::new(&file).parent().expect("data dir").to_path_buf();
    stop(child);
    assert!(!dir.exists(), "the temporary data directory is removed on exit");
}

#[test]
fn ferry_dev_insecure_runs_plaintext_and_says_so() {
    let (child, file) = start_dev(&["--insecure"]);
    let env = sourced(&file);
    assert!(env.iter().any(|(k, v)| k == "FERRY_INSECURE" && v == "true"), "{env:?}");
    let (code, text) = run(&env, &["config", "put", "k", "v"]);
    assert_eq!(code, 0, "{text}");
    stop(child);
}
