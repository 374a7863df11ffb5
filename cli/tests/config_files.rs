//! Workers materializing config into files, over real processes: a
//! 3-scheduler cluster, workers with `[[config_files]]` rules (TOML and
//! `--config-file`), and the `ferry` CLI writing keys.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ferry, metric, wait_for, Schedulers, WorkerProc};

/// `ferry --endpoints .. --json ARGS`; the revision it printed.
fn cli(endpoints: &str, args: &[&str]) -> u64 {
    let mut all = vec!["--endpoints", endpoints, "--json"];
    all.extend_from_slice(args);
    let out = ferry(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str::<serde_json::Value>(&stdout).ok().and_then(|v| v["revision"].as_u64()).unwrap_or(0)
}

/// Waits until `path` holds exactly `want`.
async fn file_becomes(path: &Path, want: &str) {
    let what = format!("{} to hold {want:?}", path.display());
    wait_for(&what, Duration::from_secs(20), || async { (std::fs::read(path).ok()? == want.as_bytes()).then_some(()) })
        .await;
}

fn read(path: &Path) -> String {
    String::from_utf8(std::fs::read(path).expect("file is there")).expect("utf-8")
}

fn hook_lines(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("hooks.log")).unwrap_or_default().lines().map(str::to_string).collect()
}

/// The root `WorkerProc::start` gives worker `name` (created, resolved).
fn root_of(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(&root).expect("root");
    root.canonicalize().expect("canonical root")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_files_follow_puts_and_gray_variants_and_outlive_the_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let endpoints = sched.addrs.join(",");

    // w1 (zone=a): a raw key and a JSON prefix from flags, properties from
    // TOML. Its resync is an hour, so it renders only on watch events.
    let r1 = root_of(dir.path(), "w1");
    let hook = format!(
        "cfg=echo \"$FERRY_CONFIG_PATH $FERRY_CONFIG_REVISION $FERRY_CONFIG_KEY$FERRY_CONFIG_PREFIX\" >> {}/hooks.log",
        r1.display()
    );
    let toml = dir.path().join("w1.toml");
    std::fs::write(
        &toml,
        format!(
            "[[config_files]]\nprefix = \"app/db/\"\npath = \"{}/etc/db.env\"\nformat = \"properties\"\nhook = \"cfg\"\n",
            r1.display()
        ),
    )
    .expect("toml");
    let (motd, db_json, db_env, color1) =
        (r1.join("etc/motd"), r1.join("etc/db.json"), r1.join("etc/db.env"), r1.join("color"));
    let admin1 = format!("127.0.0.1:{}", common::free_port());
    let w1 = WorkerProc::start(
        dir.path(),
        "w1",
        &sched.addrs,
        &[
            "--config",
            &toml.display().to_string(),
            "--admin-listen",
            &admin1,
            "--labels",
            "zone=a",
            "--hook",
            &hook,
            "--config-resync",
            "1h",
            "--config-file",
            &format!("app/motd={}:raw:cfg", motd.display()),
            "--config-file",
            &format!("app/db/={}:json:cfg", db_json.display()),
            "--config-file",
            &format!("app/color={}", color1.display()),
        ],
    );
    // w2 (zone=b) resyncs every 300 ms: it picks up gray variants, which
    // change without a watch event.
    let r2 = root_of(dir.path(), "w2");
    let (color2, flag) = (r2.join("color"), r2.join("flag"));
    let admin2 = format!("127.0.0.1:{}", common::free_port());
    let mut w2 = WorkerProc::start(
        dir.path(),
        "w2",
        &sched.addrs,
        &[
            "--admin-listen",
            &admin2,
            "--labels",
            "zone=b",
            "--config-resync",
            "300ms",
            "--config-file",
            &format!("app/color={}", color2.display()),
            "--hook",
            "broken=exit 3",
            "--config-file",
            &format!("app/flag={}:raw:broken", flag.display()),
        ],
    );

    // Each format's file appears with the right bytes.
    let put_motd = cli(&endpoints, &["config", "put", "app/motd", "hello world"]);
    cli(&endpoints, &["config", "put", "app/db/host", "db1"]);
    cli(&endpoints, &["config", "put", "app/db/port", "5432"]);
    cli(&endpoints, &["config", "put", "app/color", "blue"]);
    file_becomes(&motd, "hello world").await;
    file_becomes(&db_json, "{\n  \"host\": \"db1\",\n  \"port\": \"5432\"\n}\n").await;
    file_becomes(&db_env, "host=db1\nport=5432\n").await;
    file_becomes(&color1, "blue").await;
    file_becomes(&color2, "blue").await;
    assert_eq!(std::fs::metadata(&motd).expect("motd").mode() & 0o777, 0o644);

    // A failing hook is counted; the file it followed stays.
    cli(&endpoints, &["config", "put", "app/flag", "on"]);
    file_becomes(&flag, "on").await;
    wait_for("the failed hook to be counted", Duration::from_secs(20), || async {
        (metric(&admin2, "ferry_worker_config_hook_failures_total")? == 1.0).then_some(())
    })
    .await;
    assert_eq!(read(&flag), "on");

    // The hook ran once for the motd, with the path, revision and key.
    let motd_lines: Vec<String> =
        hook_lines(&r1).into_iter().filter(|l| l.starts_with(&format!("{} ", motd.display()))).collect();
    assert_eq!(motd_lines.len(), 1, "{motd_lines:?}");
    let fields: Vec<&str> = motd_lines[0].split(' ').collect();
    assert_eq!(fields[2], "app/motd");
    assert!(fields[1].parse::<u64>().expect("revision") >= put_motd, "{motd_lines:?}");
    assert!(hook_lines(&r1)
        .iter()
        .any(|l| l.starts_with(&format!("{} ", db_env.display())) && l.ends_with(" app/db/")));

    // The same value again: w1 renders it (its revision gauge passes the
    // put) but leaves the file and the hook alone.
    let inode = std::fs::metadata(&motd).expect("motd").ino();
    let hooks_before = hook_lines(&r1).len();
    let written_before = metric(&admin1, "ferry_worker_config_files_written_total").expect("metric");
    let again = cli(&endpoints, &["config", "put", "app/motd", "hello world"]);
    wait_for("w1 to render the repeated put", Duration::from_secs(20), || async {
        (metric(&admin1, "ferry_worker_config_revision")? >= again as f64).then_some(())
    })
    .await;
    assert_eq!(std::fs::metadata(&motd).expect("motd").ino(), inode, "an unchanged value must not rewrite the file");
    assert_eq!(hook_lines(&r1).len(), hooks_before, "an unchanged value must not rerun the hook");
    assert_eq!(metric(&admin1, "ferry_worker_config_files_written_total"), Some(written_before));

    // Gray variants: each worker's file holds the variant its labels match.
    cli(&endpoints, &["config", "gray", "set", "app/color", "teal", "--selector", "zone=b"]);
    cli(&endpoints, &["config", "gray", "set", "app/color", "green", "--selector", "zone=a"]);
    file_becomes(&color2, "teal").await;
    // w1 does not resync; a change of the main value makes it read again,
    // and it still gets its variant, not the new main value.
    cli(&endpoints, &["config", "put", "app/color", "navy"]);
    file_becomes(&color1, "green").await;
    assert_eq!(read(&color2), "teal");

    // Every scheduler dies: the last good files stay, though w2 keeps trying.
    let errors_before = metric(&admin2, "ferry_worker_config_errors_total").expect("metric");
    for id in [1, 2, 3] {
        sched.kill9(id);
    }
    wait_for("w2 to fail a render", Duration::from_secs(30), || async {
        (metric(&admin2, "ferry_worker_config_errors_total")? > errors_before).then_some(())
    })
    .await;
    assert_eq!(read(&color2), "teal");
    assert_eq!(read(&color1), "green");
    assert_eq!(read(&motd), "hello world");
    assert_eq!(read(&db_json), "{\n  \"host\": \"db1\",\n  \"port\": \"5432\"\n}\n");
    assert_eq!(read(&db_env), "host=db1\nport=5432\n");

    // A worker starting while the cluster is down leaves its file alone.
    w2.proc.kill9();
    w2.restart();
    wait_for("w2 to report the unreachable cluster", Duration::from_secs(30), || async {
        w2.proc.log_text().contains("config watch cannot reach the cluster").then_some(())
    })
    .await;
    assert_eq!(read(&color2), "teal");
    drop(w1);
}

#[test]
fn a_rule_outside_the_roots_or_with_an_unknown_hook_stops_the_worker_with_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = root_of(dir.path(), "w");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("outside");
    std::os::unix::fs::symlink(&outside, root.join("escape")).expect("symlink");
    let data = dir.path().join("data").display().to_string();
    let base = [
        "worker",
        "--name",
        "w",
        "--listen",
        "127.0.0.1:0",
        "--data",
        &data,
        "--schedulers",
        "127.0.0.1:9",
        "--allow-root",
        root.to_str().expect("utf-8"),
        "--hook",
        "reload=true",
    ];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let out = ferry(&args);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let (code, err) = run(&["--config-file", &format!("app/x={}/x", outside.display())]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--config-file") && err.contains("path:") && err.contains("outside the allowed roots"),
        "{err}"
    );

    // Inside the root by name, outside through a symlink: refused at start.
    let (code, err) = run(&["--config-file", &format!("app/x={}/escape/x", root.display())]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("config-file") && err.contains("path:") && err.contains("outside the allowed roots"), "{err}");
    assert!(!outside.join("x").exists());

    let (code, err) = run(&["--config-file", &format!("app/x={}/x:raw:restart", root.display())]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("hook: \"restart\" is not a hook of this worker"), "{err}");

    // The same from TOML.
    let toml = dir.path().join("w.toml");
    std::fs::write(
        &toml,
        format!("[[config_files]]\nkey = \"app/x\"\npath = \"{}/x\"\nhook = \"nope\"\n", root.display()),
    )
    .expect("toml");
    let (code, err) = run(&["--config", toml.to_str().expect("utf-8")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("rule 1 (key \"app/x\"): hook: \"nope\""), "{err}");
    assert!(!root.join("x").exists(), "nothing is written");
}
